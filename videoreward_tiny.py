"""A tiny random VideoReward in the released layout, for tests and the CPU demo: a base Qwen2-VL
folder (flat config, tokenizer with Qwen's pipeline and chat template, image statistics, weights) and
beside it model_config.json and checkpoint-1/model.pth, the LoRA model's state dict as VideoAlign
saves it, so that VideoRewardScorer.from_pretrained and the official inference both read it.
"""

import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import Qwen2VLConfig

import common
from videoreward import PROMPT, REWARD_TOKENS, TINY_MARK, VideoRewardModel

QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template as its tokenizer_config.json gives it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] =="
    " 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _tiny_tokenizer(vocab_size=600):
    """Byte-level BPE trained on the scoring prompt, with Qwen2's normaliser, pre-tokenizer and
    special tokens, so that transformers' Qwen2Tokenizer reads it as it reads the real one."""
    words = ["a cat walks in the park.", "two people dance on the beach at night.", "a red car drives in a city."]
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROMPT.splitlines() + words, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _released_keys(state, rank, rng):
    """A Qwen2VLModel + head state dict as VideoAlign's model.pth: the 4.45 layout under PEFT's
    prefix, every LLM projection split into a base layer and a random LoRA pair (scaling 2)."""
    out = {}
    for key, value in state.items():
        key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        module = key.rsplit(".", 1)[0]
        if key.startswith("model.layers.") and module.endswith(LORA_TARGETS):
            if key.endswith(".weight"):
                out[f"base_model.model.{module}.lora_A.default.weight"] = torch.randn(rank, value.shape[1], generator=rng) * 0.1
                out[f"base_model.model.{module}.lora_B.default.weight"] = torch.randn(value.shape[0], rank, generator=rng) * 0.1
            key = f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
        out["base_model.model." + key] = value
    out["base_model.model.lm_head.weight"] = state["model.language_model.embed_tokens.weight"]  # tied, as in the 2B
    return out


def build_tiny(out_dir, seed=0, hidden_size=64, vision_width=32):
    """Write a tiny random VideoReward into out_dir in the released layout (its base Qwen2-VL in
    out_dir/base), so VideoRewardScorer.from_pretrained(out_dir) takes the path the real one takes."""
    tokenizer = _tiny_tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_TOKENS}
    vocab = tokenizer.get_vocab_size()
    base_vocab = vocab + 8  # Qwen's embeddings are longer than its tokenizer; VideoAlign shrinks them
    head_dim = hidden_size // 4
    flat = dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_size=hidden_size,
                intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                rope_scaling={"type": "mrope", "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]},
                tie_word_embeddings=True, torch_dtype="float32", use_cache=True, use_sliding_window=False,
                sliding_window=32768, max_window_layers=2, attention_dropout=0.0, initializer_range=0.02,
                vocab_size=base_vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_config=dict(depth=2, embed_dim=vision_width, mlp_ratio=2, num_heads=2, in_chans=3,
                                   hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                                   temporal_patch_size=2))
    image_config = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                        image_mean=CLIP_MEAN, image_std=CLIP_STD, image_processor_type="Qwen2VLImageProcessor",
                        processor_class="Qwen2VLProcessor")
    config = Qwen2VLConfig(**json.loads(json.dumps(flat)))  # a copy: the config rewrites rope_scaling in place
    config.text_config.vocab_size = vocab + len(REWARD_TOKENS)
    torch.manual_seed(seed)
    model = VideoRewardModel(config)
    with torch.no_grad():  # at the default std a model this small barely sees its frames
        for name, p in model.named_parameters():
            if p.ndim == 2 and "norm" not in name:
                p.normal_(0, 0.2 if "visual" in name else 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    released = _released_keys(state, rank=4, rng=torch.Generator().manual_seed(seed + 1))

    tmp = common.tmp_name(out_dir)
    base = os.path.join(tmp, "base")
    os.makedirs(base)
    tokenizer.save(os.path.join(base, "tokenizer.json"))
    tokenizer_config = dict(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", unk_token=None, additional_special_tokens=QWEN_TOKENS[1:],
                            chat_template=CHAT_TEMPLATE, model_max_length=32768, split_special_tokens=False,
                            clean_up_tokenization_spaces=False, errors="replace")
    for name, obj in [("config.json", flat), ("tokenizer_config.json", tokenizer_config), ("preprocessor_config.json", image_config),
                      ("chat_template.json", {"chat_template": CHAT_TEMPLATE})]:
        with open(os.path.join(base, name), "w") as f:
            json.dump(obj, f, indent=2)
    # The base's own weights (4.45 names, its longer vocabulary); VideoAlign overwrites them all.
    base_weights = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in released.items()
                    if ".lora_" not in k and "rm_head" not in k}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        base_weights[k] = torch.cat([base_weights[k][:vocab], torch.zeros(8, hidden_size)])
    save_file({k: v.clone() for k, v in base_weights.items()}, os.path.join(base, "model.safetensors"),
              metadata={"format": "pt"})
    model_config = {
        "data_config": dict(meta_data="", data_dir="", meta_data_test=None, max_frame_pixels=200704, num_frames=None,
                            fps=2.0, p_shuffle_frames=0.0, p_color_jitter=0.0, eval_dim=["VQ", "MQ", "TA"],
                            prompt_template_type="detailed_special", add_noise=False, sample_type="uniform",
                            use_tied_data=True),
        "model_config": dict(model_name_or_path="base", model_revision="main", output_dim=1, use_special_tokens=True,
                             freeze_vision_tower=False, freeze_llm=False, tune_merger=True, torch_dtype="float32",
                             trust_remote_code=False, attn_implementation=None, load_in_8bit=False, load_in_4bit=False,
                             bnb_4bit_quant_type="nf4", use_bnb_nested_quant=False, reward_token="special",
                             loss_type="btt"),
        "peft_lora_config": dict(lora_enable=True, vision_lora=False, lora_r=4, lora_alpha=8, lora_dropout=0.05,
                                 lora_target_modules=None, lora_namespan_exclude=["lm_head", "rm_head", "embed_tokens",
                                                                                  "visual"],
                                 lora_modules_to_save=None, lora_task_type="CAUSAL_LM", use_rslora=False,
                                 num_lora_modules=-1),
        "inference_config": dict(VQ_mean=3.6757, VQ_std=2.2476, MQ_mean=1.1646, MQ_std=1.3811, TA_mean=2.8105,
                                 TA_std=2.5121),
    }
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
        json.dump(model_config, f, indent=4)
    os.makedirs(os.path.join(tmp, "checkpoint-1"))
    torch.save(released, os.path.join(tmp, "checkpoint-1", "model.pth"))
    with open(os.path.join(tmp, TINY_MARK), "w") as f:
        json.dump({"random": True, "built_by": "videoreward_tiny.build_tiny"}, f)
    os.replace(tmp, out_dir)
    return str(out_dir)
