"""qcompiler's passes, one module per pass family; importing this package registers them."""

from . import calibrate, convert, fake_quant, dopq, fold_batchnorm, gptq, qat, rotate, smooth  # noqa: F401
