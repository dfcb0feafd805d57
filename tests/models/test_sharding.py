import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from dlm.models.sharding import decoder_layer_classes, decoder_layers
from dlm.settings import ConfigError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64)


@pytest.mark.parametrize("arch,layer", [("qwen2", "Qwen2DecoderLayer"), ("qwen3", "Qwen3DecoderLayer"),
                                        ("llama", "LlamaDecoderLayer")])
def test_wrap_policy_names_the_decoder_layer_class(arch, layer):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY))
    assert {c.__name__ for c in decoder_layer_classes(model)} == {layer}
    assert len(decoder_layers(model)) == 2


def test_a_model_without_no_split_modules_is_one_line_error():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **TINY))
    for module in model.modules():  # the CausalLM and its inner base model both name it
        module._no_split_modules = []
    with pytest.raises(ConfigError, match="no decoder-layer class"):
        decoder_layer_classes(model)
