"""A real vision-language model split across embxfer: encoder engine, transfer, language engine.

`models` builds a tiny random Qwen3-VL or Qwen2.5-VL from its `transformers` config classes,
`processor` synthesizes what the model's processor would hand the encoder engine, `engines`
holds the two halves (encoder engine -> `Payload` -> language engine), `reference` runs the
monolithic model for comparison and `run` is the command-line comparison (CPU or GPU).

Nothing is downloaded: the weights are random and the configurations are built in code.
"""

import os

# huggingface_hub reads this when it is first imported; the example never needs the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
