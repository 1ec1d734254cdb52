from .celery_app import ContextCelery as ContextCelery
from .extension import FlaskCelery as FlaskCelery
from .logs import CarriedValuesFilter as CarriedValuesFilter
from .models import InvalidReferenceError as InvalidReferenceError
from .models import MissingInstanceError as MissingInstanceError
from .task import ContextTask as ContextTask

__all__ = [
    "CarriedValuesFilter",
    "ContextCelery",
    "ContextTask",
    "FlaskCelery",
    "InvalidReferenceError",
    "MissingInstanceError",
]
