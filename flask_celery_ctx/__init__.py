from .extension import FlaskCelery as FlaskCelery
from .models import InvalidReferenceError as InvalidReferenceError
from .models import MissingInstanceError as MissingInstanceError
from .task import ContextTask as ContextTask

__all__ = [
    "ContextTask",
    "FlaskCelery",
    "InvalidReferenceError",
    "MissingInstanceError",
]
