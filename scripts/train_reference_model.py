"""Train one of kvcal's small reference causal LMs on the CPU, seeded, and write it in Hugging Face format.

The models exist so that calibration and compression quality are measured on genuinely trained KV
statistics. They must use the middle of their context, so the training mix teaches long-range copying
from the first step: besides plain text (prose and code), most sequences repeat earlier spans (their own
text, foreign text, or runs of random words planted early) far later in the sequence.

    python scripts/train_reference_model.py --family llama --out artifacts/kvcal-ref-llama
    python scripts/train_reference_model.py --family qwen3 --out artifacts/kvcal-ref-qwen3

Checkpoints every ``--ckpt-every`` steps into ``OUT/.train/`` and resumes from there, so an interrupted
run loses little. ``--max-minutes`` bounds wall time; the run then finishes (cosine schedule is set by
``--steps``) and writes weights, tokenizer, ``training_log.jsonl`` and the model card ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcal.data import bundled_corpus, load_texts, token_stream  # noqa: E402
from kvcal.eval.retrieval import NeedleProbe, needle_accuracy, needle_vocabulary  # noqa: E402
from kvcal.eval.scoring import evict_middle  # noqa: E402

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    fast.model_max_length = 2048
    fast.save_pretrained(out)
    return fast


def make_config(family: str, vocab_size: int, eos_id: int, ctx: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=ctx * 2,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    raise SystemExit(f"unknown family {family}; choose llama or qwen3")


class CopyMix:
    """Training sequences: plain windows, or windows in which spans recur far from where they first appear."""

    def __init__(self, stream: torch.Tensor, word_ids: list[list[int]], seq_len: int, seed: int, plain_share: float,
                 copies: tuple[int, int] = (4, 16), random_word_share: float = 0.5, repeat_share: float = 0.0):
        self.stream, self.word_ids, self.T = stream, word_ids, seq_len
        self.rng = random.Random(seed)
        self.plain_share = plain_share
        self.min_copies, self.max_copies = copies
        self.random_word_share = random_word_share
        self.repeat_share = repeat_share

    def window(self, n: int) -> list[int]:
        s = self.rng.randrange(0, self.stream.numel() - n)
        return self.stream[s : s + n].tolist()

    def random_words(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            out.extend(self.rng.choice(self.word_ids))
        return out[:n]

    def repeat_sequence(self) -> list[int]:
        """A run of random words recurring 2-4 times between stretches of text: every recurrence is
        predictable only by looking it up earlier in the context, the cleanest signal for induction heads."""
        run = self.random_words(self.rng.randint(48, 192))
        seq: list[int] = []
        while len(seq) < self.T:
            seq.extend(self.window(self.rng.randint(0, 320)))
            seq.extend(run)
        return seq[: self.T]

    def sequence(self) -> list[int]:
        u = self.rng.random()
        if u < self.repeat_share:
            return self.repeat_sequence()
        seq = self.window(self.T)
        if u < self.repeat_share + self.plain_share:
            return seq
        for _ in range(self.rng.randint(self.min_copies, self.max_copies)):
            L = self.rng.randint(16, 64)
            src = self.rng.randrange(0, self.T // 2)
            kind = self.rng.random()
            if kind < self.random_word_share:
                span = self.random_words(L)
                seq[src : src + L] = span
            elif kind < self.random_word_share + 0.2:
                span = self.window(L)
                seq[src : src + L] = span
            else:
                span = seq[src : src + L]
            dst_lo = src + L + 64
            if dst_lo >= self.T - L:
                continue
            dst = self.rng.randrange(dst_lo, self.T - L)
            seq[dst : dst + L] = span
        return seq[: self.T]

    def batch(self, b: int) -> torch.Tensor:
        return torch.tensor([self.sequence() for _ in range(b)], dtype=torch.long)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    model.train()
    return sum(losses) / len(losses)


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of held-out tokens under the add-one-smoothed unigram distribution of the training split."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout.flatten()].mean())


def probe(model, trials, sink=4, window=128) -> tuple[float, float]:
    model.eval()
    full = needle_accuracy(model, trials)
    evicted = needle_accuracy(model, trials, lambda c: evict_middle(c, sink, window))
    model.train()
    return full, evicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llama", "qwen3"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-minutes", type=float, default=70.0)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--plain-share", type=float, default=0.15)
    ap.add_argument("--copies", type=int, nargs=2, default=(4, 16), help="min and max copied spans per copy sequence")
    ap.add_argument("--repeat-share", type=float, default=0.4, help="share of sequences that repeat one run of random words")
    ap.add_argument("--random-word-share", type=float, default=0.5, help="share of copied spans that are random words")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--init-from", type=Path, help="start from these committed weights (fresh optimizer) to train on")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / ".train"
    work.mkdir(exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_texts = load_texts([bundled_corpus("train")])
    eval_texts = load_texts([bundled_corpus("eval")])
    if (args.out / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(args.out)
    elif args.init_from:
        # A continuation must keep the vocabulary its weights were trained with.
        tok = AutoTokenizer.from_pretrained(args.init_from)
        tok.save_pretrained(args.out)
    else:
        tok = train_tokenizer(train_texts, args.vocab, args.out)
    eos = tok.eos_token_id
    stream = token_stream(tok, train_texts)
    eval_stream = token_stream(tok, eval_texts)
    heldout = eval_stream[: (eval_stream.numel() // args.seq_len) * args.seq_len].view(-1, args.seq_len)[:16]
    words = needle_vocabulary(train_texts)
    word_ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    trials = NeedleProbe(context_len=args.seq_len, trials=16, seed=1).build(tok, eval_texts)

    config = make_config(args.family, len(tok), eos, args.seq_len)
    model = AutoModelForCausalLM.from_config(config)
    if args.init_from and not (work / "checkpoint.pt").exists():
        from safetensors.torch import load_file

        # Tied embeddings are saved once; strict=False lets the tied lm_head pick them up.
        missing = model.load_state_dict(load_file(str(args.init_from / "model.safetensors")), strict=False).missing_keys
        if [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"--init-from {args.init_from} lacks weights: {missing}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, elapsed, log, tokens_seen = 0, 0.0, [], 0
    phases: list[dict] = []
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        tokens_seen = state.get("tokens_seen", step * args.batch * args.seq_len)
        # Runs before data-mix phases were recorded used the first mix: plain 25%, 2-12 copies, 35% random words.
        phases = state.get("phases", [{"from_step": 0, "plain_share": 0.25, "copies": [2, 12], "random_word_share": 0.35, "lr": args.lr}])
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    phase = {"from_step": step, "seq_len": args.seq_len, "batch": args.batch, "plain_share": args.plain_share,
             "copies": list(args.copies),
             "random_word_share": args.random_word_share, "repeat_share": args.repeat_share, "lr": args.lr,
             "schedule_steps": args.steps}
    if not phases or {k: v for k, v in phases[-1].items() if k != "from_step"} != {k: v for k, v in phase.items() if k != "from_step"}:
        phases.append(phase)
    # Each data-mix phase (a fresh run or a continuation) has its own warmup and cosine decay, running
    # from the step it starts at to --steps, so a continuation does not inherit a spent schedule.
    start = phases[-1]["from_step"]
    span = max(1, args.steps - start)
    warmup = min(100, span // 10)

    def lr_at(step: int) -> float:
        k = step - start
        if k < warmup:
            return args.lr * (k + 1) / warmup
        frac = (k - warmup) / max(1, span - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    mix = CopyMix(stream, word_ids, args.seq_len, seed=args.seed * 1000 + step, plain_share=args.plain_share,
                  copies=tuple(args.copies), random_word_share=args.random_word_share, repeat_share=args.repeat_share)

    model.train()
    t0 = time.time() - elapsed
    train_losses: list[float] = []
    while step < args.steps and (time.time() - t0) < args.max_minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = mix.batch(args.batch)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        train_losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step} loss {sum(train_losses[-10:]) / 10:.3f} lr {lr_at(step):.2e} "
                  f"{(time.time() - t0) / step:.2f}s/step", flush=True)
        if step % args.eval_every == 0:
            full, ev = probe(model, trials[:8])
            row = {"step": step, "minutes": (time.time() - t0) / 60, "train_loss": sum(train_losses[-50:]) / len(train_losses[-50:]),
                   "heldout_loss": heldout_loss(model, heldout[:8]), "needle_full": full, "needle_evicted": ev}
            log.append(row)
            print(json.dumps(row), flush=True)
        if step % args.ckpt_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": time.time() - t0,
                        "log": log, "phases": phases, "tokens_seen": tokens_seen, "py_rng": random.getstate(), "torch_rng": torch.get_rng_state()}, work / "tmp.pt")
            (work / "tmp.pt").replace(ckpt)
    wall = time.time() - t0

    final_train = sum(train_losses[-50:]) / max(1, len(train_losses[-50:]))
    held = heldout_loss(model, heldout)
    uni = unigram_loss(stream, heldout, len(tok))
    full, ev = probe(model, trials)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    (args.out / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    n_params = sum(p.numel() for p in model.parameters())
    card = {
        "family": args.family, "parameters": n_params, "steps": step, "wall_minutes": round(wall / 60, 1),
        "threads": torch.get_num_threads(), "seq_len": args.seq_len, "batch": args.batch, "tokens_seen": tokens_seen,
        "final_train_loss": round(final_train, 4), "heldout_loss": round(held, 4), "heldout_ppl": round(math.exp(held), 2),
        "unigram_heldout_loss": round(uni, 4), "unigram_heldout_ppl": round(math.exp(uni), 2),
        "needle_full_cache": round(full, 4), "needle_middle_evicted": round(ev, 4),
        "data_phases": phases,
        "initialized_from": (json.loads((args.init_from / "model_card.json").read_text()) if args.init_from else None),
        "heldout_windows": int(heldout.shape[0]), "needle_trials": len(trials), "seed": args.seed,
    }
    (args.out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card_markdown(args, card, config))
    print(json.dumps(card, indent=2))


def _shape(phase: dict) -> str:
    return f" ({phase['batch']} x {phase['seq_len']} tokens a step)" if "seq_len" in phase else ""


def _schedule(card: dict, i: int) -> str:
    p = card["data_phases"][i]
    end = card["data_phases"][i + 1]["from_step"] if i + 1 < len(card["data_phases"]) else card["steps"]
    planned = p.get("schedule_steps", 1400)
    # Phases recorded with their shape had a schedule of their own; older ones shared one from step 0.
    text = f"cosine from step {p['from_step']} to {planned}" if "seq_len" in p else f"cosine over {planned} steps from step 0"
    return text + (f", ended at step {end} (wall-time limit or next phase)" if end < planned else "")


def _base_line(card: dict) -> str:
    base = card.get("initialized_from")
    if not base:
        return "random initialization"
    return (f"the earlier committed weights ({base['steps']} steps, {base['tokens_seen']:,} tokens, "
            f"{base['wall_minutes']} min; their phases are in `model_card.json`)")


def model_card_markdown(args, card: dict, config) -> str:
    return f"""# kvcal-ref-{args.family}

A small {config.model_type} causal LM trained from scratch by `scripts/train_reference_model.py` so that
kvcal's calibration and compression quality are measured on genuinely trained KV statistics.
Not a general-purpose model.

| | |
|---|---|
| architecture | {config.architectures or config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, head_dim {config.head_dim} |
| parameters | {card['parameters']:,} |
| tokenizer | byte-level BPE, {config.vocab_size} tokens, trained on the training split |
| context trained | {card['seq_len']} tokens |
| training | {card['steps']} steps, {card['tokens_seen']:,} tokens (phases below), AdamW, cosine per phase, seed {card['seed']}, CPU, {card['threads']} thread(s), {card['wall_minutes']} min wall |
| initialized from | {_base_line(card)} |
| final train loss (copy mix) | {card['final_train_loss']} |
| held-out loss (eval split, plain text, {card['heldout_windows']} x {card['seq_len']} tokens) | {card['heldout_loss']} (ppl {card['heldout_ppl']}) |
| unigram baseline on the same tokens | {card['unigram_heldout_loss']} (ppl {card['unigram_heldout_ppl']}) |
| needle probe, full cache | {card['needle_full_cache']:.3f} token accuracy |
| needle probe, middle evicted (4 sinks + last 128) | {card['needle_middle_evicted']:.3f} token accuracy |

**Training data.** `artifacts/corpus/train.jsonl.xz`: the CPython 3.11 documentation sources (English prose)
and standard-library modules (code), PSF License 2.0. A share of sequences are plain windows; the rest repeat
spans of 16-64 tokens (runs of random words, foreign text, or their own text) at least 64 tokens after they
first appear, so the model learns to use the middle of its context. Mix phases (from `model_card.json`):

{chr(10).join(f"- from step {p['from_step']}{_shape(p)}: {int(p['plain_share'] * 100)}% plain, {p['copies'][0]}-{p['copies'][1]} copied spans per copy sequence, {int(p['random_word_share'] * 100)}% of them random words, {int(p.get('repeat_share', 0) * 100)}% of sequences repeating one run of random words 2-4 times, peak lr {p['lr']}, {_schedule(card, i)}" for i, p in enumerate(card['data_phases']))}

**Needle probe.** `kvcal.eval.retrieval.NeedleProbe` (seed 1, {card['needle_trials']} trials): a 32-token run of
random words planted at the middle of a {card['seq_len']}-token context from the eval split; its first 8 tokens are
repeated at the end and the model must produce the other 24. Reproduce all figures with
`python scripts/check_reference_models.py`.
"""


if __name__ == "__main__":
    main()
