from .celery_app import ContextCelery as ContextCelery
from .extension import FlaskCelery as FlaskCelery
from .models import InvalidReferenceError as InvalidReferenceError
from .models import MissingInstanceError as MissingInstanceError
from .task import ContextTask as ContextTask

__all__ = [
    "ContextCelery",
    "ContextTask",
    "FlaskCelery",
    "InvalidReferenceError",
    "MissingInstanceError",
]
