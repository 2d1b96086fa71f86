"""The rewards, chosen in one place (`reward.reward`): VideoScore (common.VideoScorer), the world's
exact reward (world.py), the weight-free features (features.py), or the ensemble of a learned one
with the features. Each has `aspects` and `score(videos, prompts) -> [{aspect: score}]`.
"""

import argparse
import json
import os
from itertools import product

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import Idefics2Config, Idefics2ImageProcessor, Idefics2Processor, PreTrainedTokenizerFast

import common
import features
import world


def build_tiny(args):
    """With build_tiny, a tiny VideoScore at reward_model where the reward uses one and none is there."""
    if args.build_tiny and uses_videoscore(args) and not os.path.exists(os.path.join(args.reward_model, "config.json")):
        build_tiny_videoscore(args.reward_model)


def videoscore(args, device=None):
    """VideoScore from reward_model, built tiny first there when build_tiny is set."""
    build_tiny(args)
    dtype = common.weight_dtype(args.mixed_precision) if args.mixed_precision != "no" else None
    return common.VideoScorer.from_pretrained(args.reward_model, num_frames=args.reward_num_frames, device=device,
                                              dtype=dtype, batch_size=args.reward_batch_size, cache_dir=args.cache_dir)


def ensemble(args, device=None):
    learned = REWARDS[args.ensemble_with](argparse.Namespace(**{**vars(args), "reward": args.ensemble_with}), device)
    return features.EnsembleReward(learned, args.ensemble_with)


REWARDS = {
    "videoscore": videoscore,
    "world": lambda args, device=None: world.WorldReward(),
    "features": lambda args, device=None: features.FeatureReward(),
    "ensemble": ensemble,
}
LEARNED = ("videoscore", "world")  # what the ensemble averages the features with

OPTIONS = {
    "reward": ("videoscore", "videoscore | world (world.py's exact reward, for the world's prompts) | features "
                             "(weight-free, features.py) | ensemble (the mean of ensemble_with and features)",
               {"choices": tuple(REWARDS)}),
    "ensemble_with": ("videoscore", "the learned reward reward: ensemble averages features with: videoscore | world",
                      {"choices": LEARNED}),
    "reward_model": ("TIGER-Lab/VideoScore-v1.1", "VideoScore hub id or local folder", {"input": True}),
    "reward_num_frames": (None, "frames the reward sees (default: 48 for v1.1, 16 for v1)", {"type": int, "min": 1}),
    "reward_batch_size": (4, "videos per reward forward", {"min": 1}),
    "aspects": (["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment"],
                "aspects that count: block ranking, pair selection, the table's average (the paper's four)",
                {"choices": common.ASPECTS}),
}


def uses_videoscore(args):
    return "videoscore" in (args.reward, args.ensemble_with if args.reward == "ensemble" else None)


def required_models(args):
    """For stage.check_models: the VideoScore checkpoint, where the reward uses it."""
    if not uses_videoscore(args):
        return []
    return [dict(where="reward.reward_model", name=args.reward_model, files=["config.json"],
                 what="a VideoScore checkpoint (TIGER-Lab/VideoScore-v1.1)", tiny=True)]


def load_reward(args, device=None):
    """The reward of the config; it must score every aspect of `aspects`."""
    reward = REWARDS[args.reward](args, device)
    missing = [a for a in args.aspects if a not in reward.aspects]
    if missing:
        raise common.ConfigError(f"reward.aspects: reward {args.reward} scores only {', '.join(reward.aspects)}; got "
                                 f"{', '.join(missing)}" + (" (use reward: ensemble for text_alignment)"
                                                            if args.reward == "features" else ""))
    return reward


def beside(args):
    """The weight-free features, reported beside a learned reward (an ensemble reports them itself)."""
    return features.FeatureReward() if args.reward in LEARNED else None


def check_prompts(reward, prompts, where):
    """Every prompt is one the reward can score, checked before anything is generated."""
    for p in prompts:
        why = getattr(reward, "unreadable", lambda p: None)(p)
        if why:
            raise common.ConfigError(f"{where}: prompt {p[:80]!r} {why}")


def label(args):
    """What a table says it scored with: never a real model's name for a random tiny one."""
    names = {"world": "world (exact)", "features": "features (weight-free)"}
    if args.reward in names:
        return names[args.reward]
    learned = args.ensemble_with if args.reward == "ensemble" else "videoscore"
    name = names.get(learned) or (f"random tiny VideoScore ({args.reward_model}; its scores mean nothing)"
                                  if is_tiny(args.reward_model) else args.reward_model)
    return f"mean of {name} and features (weight-free)" if args.reward == "ensemble" else name


# -----------------------------------------------------------------------------
# A tiny VideoScore of the real layout, random, for tests and the CPU demo.

TINY_MARK = "vip_tiny.json"  # written into the folder, so that no table calls it VideoScore


def is_tiny(path):
    return os.path.isfile(os.path.join(os.fspath(path), TINY_MARK))


def _tiny_bpe_tokenizer(vocab_size=400):
    """A byte-level BPE tokenizer trained here, on the scoring prompt and a few hundred generated
    captions; byte-level so no text is out of vocabulary. BOS added like Idefics2's Mistral one."""
    subjects = ["a cat", "a dog", "two people", "a red car", "an old man", "a small bird", "the ocean", "a robot"]
    actions = ["walks", "runs", "jumps", "dances", "sleeps", "flies"]
    places = ["in the park", "on the beach", "at night", "under the rain", "in a city", "near a house"]
    lines = common.REGRESSION_QUERY_PROMPT.splitlines() + [" ".join(t) + "." for t in product(subjects, actions, places)]
    tok = Tokenizer(BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    # Idefics2 pads with <unk>, so padding is only recognisable through the attention mask.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def build_tiny_videoscore(out_dir, seed=0, image_size=32, image_seq_len=4, hidden_size=56):
    """Write a tiny random VideoScore checkpoint (model, processor, tokenizer) into out_dir, with
    the real layout, so VideoScorer.from_pretrained(out_dir) takes the same path as the real one."""
    image_processor = Idefics2ImageProcessor(do_image_splitting=False, size={
        "longest_edge": image_size, "shortest_edge": image_size // 2})
    # The processor adds <fake_token_around_image>, <image> and <end_of_utterance> to the
    # tokenizer, so the vocabulary size is read after building it.
    processor = Idefics2Processor(image_processor, _tiny_bpe_tokenizer(), image_seq_len=image_seq_len)
    tokenizer = processor.tokenizer
    # At the default init std (0.02) a model this small barely sees its frames, so a wrong frame
    # choice would go unnoticed in tests; 0.2 makes the scores depend on the pixels.
    shared = dict(hidden_size=hidden_size, initializer_range=0.2)
    config = Idefics2Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, **shared),
        vision_config=dict(intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, **shared),
        # Idefics2 requires: latents == image_seq_len, perceiver width == text width, kv heads <= heads.
        perceiver_config=dict(rms_norm_eps=1e-5, resampler_n_latents=image_seq_len, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1, **shared),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), num_labels=len(common.ASPECTS),
        problem_type="regression", initializer_range=0.2)
    torch.manual_seed(seed)
    model = common.Idefics2ForSequenceClassification(config)
    tmp = common.tmp_name(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # Released checkpoints predate transformers 5 and keep the image processor in its own file
    # beside a two-key processor_config.json: write that layout so loading takes the same path.
    image_processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "processor_config.json"), "w") as f:
        json.dump({"image_seq_len": image_seq_len, "processor_class": "Idefics2Processor"}, f, indent=2)
    with open(os.path.join(tmp, TINY_MARK), "w") as f:  # so no table calls it VideoScore
        json.dump({"random": True, "built_by": "build_tiny"}, f)
    os.replace(tmp, out_dir)
    return str(out_dir)

