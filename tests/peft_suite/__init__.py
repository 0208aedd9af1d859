"""PEFT's own test suite, ported onto peftcompile's API (issue #12).

Sources: huggingface/peft ``tests/test_custom_models.py`` (+ ``testing_common.PeftCommonTester``),
``tests/test_decoder_models.py``, ``tests/test_initialization.py`` and ``tests/test_config.py``,
restricted to LoRA and GraLoRA (PEFT has no separate ``test_gralora.py``: its GraLoRA cases live in
those files). Test names keep PEFT's; PEFT's assertions and tolerances are kept, and where useful
the same model and weights run through ``peft.get_peft_model`` as the yardstick. Where peftcompile
differs on purpose, the test asserts our documented behaviour, with a comment naming the README line.
"""
