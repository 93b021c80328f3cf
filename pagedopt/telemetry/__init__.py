from . import sink
