from .celery_app import ContextCelery as ContextCelery
from .errors import ConfigurationError as ConfigurationError
from .extension import FlaskCelery as FlaskCelery
from .logs import CarriedValuesFilter as CarriedValuesFilter
from .models import InvalidReferenceError as InvalidReferenceError
from .models import MissingInstanceError as MissingInstanceError
from .task import ContextTask as ContextTask

__all__ = [
    "CarriedValuesFilter",
    "ConfigurationError",
    "ContextCelery",
    "ContextTask",
    "FlaskCelery",
    "InvalidReferenceError",
    "MissingInstanceError",
]
