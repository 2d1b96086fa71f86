import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from curate import ASPECT_QUESTIONS, LLMRelevance  # noqa: E402

def build_tiny_llm(out_dir, seed=0):
    """A random ~150k-parameter Llama and a byte-level BPE tokenizer trained here, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = "a cat dog car bird man woman runs jumps flies slowly red blue two three glass water camera pans zoom"
    text = [f"Question: Video prompt: \"{words}\"\nDoes this prompt ask for {q}? Answer yes or no.\nAnswer: yes no"
            for q in ASPECT_QUESTIONS.values()] + ["Yes No yes no"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    # A wide init keeps the random model's yes/no margins far apart across prompts.
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.5, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


# Lengths far apart, so every batch is left-padded.
PROMPTS = [
    "a cat sleeps",
    "a red car races down a wet street at night while the camera tracks it",
    "two dogs",
    "golden sunset over the ocean, cinematic, 4k",
    "a man slowly walks through a foggy forest while the camera pans left and birds fly overhead",
    "a glass of water is poured",
]
ASPECTS = ["dynamic_degree", "visual_quality"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A 64-wide model gains nothing from threads, and OpenMP's barriers stall for whole time slices
    # when another process holds a core: one thread keeps this module fast on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return build_tiny_llm(str(tmp_path_factory.mktemp("tiny llm") / "model"), seed=0)


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_llm, tmp_path_factory):
    """Same tokenizer, GPT-2 body: absolute positions, so left padding shows unless positions skip the pads."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = str(tmp_path_factory.mktemp("tiny gpt2"))
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                               initializer_range=0.5)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def judge(request, tiny_llm, tiny_gpt2):
    return LLMRelevance(tiny_llm if request.param == "llama" else tiny_gpt2, device="cpu", batch_size=4)


def single_margins(judge, prompts, aspects):
    """Each question alone, unpadded, without a mask or positions: what batching must reproduce."""
    out = torch.empty(len(prompts), len(aspects))
    for i, p in enumerate(prompts):
        for j, a in enumerate(aspects):
            ids = judge.tokenizer(judge.query(p, a), add_special_tokens=not judge.chat, return_tensors="pt").input_ids
            with torch.inference_mode():
                logp = judge.model(ids).logits[0, -1].float().log_softmax(-1)
            out[i, j] = logp[judge.yes_ids].logsumexp(0) - logp[judge.no_ids].logsumexp(0)
    return out


def test_answer_tokens(judge):
    tok = judge.tokenizer
    assert tok.encode(" yes", add_special_tokens=False)[0] in judge.yes_ids
    assert tok.encode(" no", add_special_tokens=False)[0] in judge.no_ids
    assert not set(judge.yes_ids) & set(judge.no_ids)
    for ids, word in ((judge.yes_ids, "yes"), (judge.no_ids, "no")):
        assert all(word.startswith(tok.decode([i]).strip().lower()) and tok.decode([i]).strip() for i in ids)


def test_batched_equals_single(judge):
    assert not judge.chat and judge.query("x", "dynamic_degree").startswith("Question:")
    lengths = {len(judge.tokenizer(judge.query(p, "dynamic_degree")).input_ids) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)
    expected = single_margins(judge, PROMPTS, ASPECTS)
    keep = judge(PROMPTS, ASPECTS)
    got = torch.tensor([[m[a] for a in ASPECTS] for m in judge.last_margins])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert keep == (expected > 0).any(1).tolist()


def test_chat_template_path(tiny_llm):
    judge = LLMRelevance(tiny_llm, device="cpu", batch_size=3)
    judge.tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                                     "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    judge.chat = True
    assert judge.query("a cat sleeps", "dynamic_degree").startswith("<s>user\n")
    judge(PROMPTS, ASPECTS)
    got = torch.tensor([[m[a] for a in ASPECTS] for m in judge.last_margins])
    torch.testing.assert_close(got, single_margins(judge, PROMPTS, ASPECTS), atol=1e-4, rtol=0)


def test_deterministic(judge):
    first, margins = judge(PROMPTS, ASPECTS), judge.last_margins
    assert judge(PROMPTS, ASPECTS) == first and judge.last_margins == margins


def test_mixed(tiny_llm):
    # build_tiny_llm's seed 0 gives a mix; all-True or all-False would make the checks above say little
    judge = LLMRelevance(tiny_llm, device="cpu")
    for aspects in (ASPECTS, ["dynamic_degree"]):
        keep = judge(PROMPTS, aspects)
        assert any(keep) and not all(keep)


def test_unknown_aspect(judge):
    with pytest.raises(ValueError, match="dynamic_degree"):
        judge(PROMPTS, ["motion"])
    with pytest.raises(ValueError, match="text_alignment"):
        judge(PROMPTS, [])
    assert set(ASPECT_QUESTIONS) >= set(ASPECTS)
