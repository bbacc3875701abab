"""denseflex-onnx: low-rank factorization of ONNX models as a design space exploration."""
__version__ = "0.1.0"
