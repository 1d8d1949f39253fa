"""qcompiler's passes, one module per pass family; importing this package registers them."""

from . import calibrate, convert, fake_quant, dopq, fold_batchnorm, gptq, hawq, qat, rotate, smooth  # noqa: F401
from . import token_bits  # noqa: F401
