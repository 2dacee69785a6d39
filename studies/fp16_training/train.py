"""Training one run with transformers' own classes, saving hyprec-loadable checkpoints along the way."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from studies.fp16_training.corpus import save_tokenizer
from studies.fp16_training.grid import RunConfig

MASK_RATE = 0.15  # BERT's masked-language-model share of tokens


def build_model(cfg: RunConfig) -> torch.nn.Module:
    """A randomly initialised model of ``cfg``'s family and shape (seeded by ``cfg.seed``), in float32."""
    torch.manual_seed(cfg.seed)
    head_dim = cfg.hidden // cfg.heads
    shape = dict(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        # Checkpoints are measured on windows of the training length: no untrained position is read.
        max_position_embeddings=cfg.seq_len,
    )
    if cfg.family == "bert":
        bert = transformers.BertConfig(
            **shape, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, pad_token_id=0
        )
        return transformers.BertForMaskedLM(bert)
    decoder = dict(
        **shape,
        num_key_value_heads=cfg.heads,
        head_dim=head_dim,
        attention_bias=cfg.bias,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if cfg.family == "llama":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**decoder, hidden_act=cfg.activation, mlp_bias=cfg.bias)
        )
    if cfg.family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**decoder, hidden_act=cfg.activation))
    if cfg.family == "gemma3":
        # Gemma ties its embeddings by design; the run's ``tied`` field says so in the results.
        gemma = transformers.Gemma3TextConfig(
            **{**decoder, "tie_word_embeddings": True},
            hidden_activation=cfg.activation,
            query_pre_attn_scalar=head_dim,
            sliding_window=cfg.seq_len,
        )
        model = transformers.Gemma3ForCausalLM(gemma)
        if not cfg.embed_scale:
            model.model.embed_tokens.embed_scale.fill_(1.0)
        return model
    raise ValueError(f"family {cfg.family!r}")


def _is_norm(name: str) -> bool:
    return "norm" in name.lower()


def optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices and embeddings; norm gains only when ``cfg.decay_norms``; biases never."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        is_gain = _is_norm(name) and not name.endswith("bias")
        (decay if (p.ndim >= 2 or (is_gain and cfg.decay_norms)) else keep).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=cfg.eps)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to a tenth of it at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(cfg: RunConfig, stream: torch.Tensor, tok: Tokenizer) -> Iterator[dict[str, torch.Tensor]]:
    """Random windows of the token stream (seeded), as the family's training inputs."""
    gen = torch.Generator().manual_seed(cfg.seed)
    body = cfg.seq_len - (2 if cfg.kind == "encoder" else 1)  # room for [CLS] ... [SEP], or for <s>
    while True:
        starts = torch.randint(0, len(stream) - body, (cfg.batch,), generator=gen)
        windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
        if cfg.kind == "decoder":
            ids = torch.cat([torch.full((cfg.batch, 1), tok.token_to_id("<s>")), windows], dim=1)
            yield {"input_ids": ids, "labels": ids}
            continue
        cls, sep, mask = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
        ids = torch.cat([torch.full((cfg.batch, 1), cls), windows, torch.full((cfg.batch, 1), sep)], dim=1)
        chosen = torch.rand(ids.shape, generator=gen) < MASK_RATE
        chosen[:, [0, -1]] = False
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        # BERT's 80/10/10: most chosen tokens become [MASK], a tenth a random token, a tenth stay.
        roll = torch.rand(ids.shape, generator=gen)
        inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask), ids)
        random_ids = torch.randint(5, cfg.vocab, ids.shape, generator=gen)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
        yield {"input_ids": inputs, "labels": labels}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:05d}"


@torch.no_grad()
def _as_scaled_gemma(model: torch.nn.Module) -> torch.nn.Module:
    """A Gemma trained with its embedding multiplier at 1, as the Gemma-3 architecture that loaders build (which
    multiplies the embedding by sqrt(hidden)): the table divided by that, the head untied and kept as trained. It
    computes what was trained, up to one rounding of the table."""
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    table = model.model.embed_tokens.weight
    state = model.state_dict() | {
        "lm_head.weight": table.clone(),
        "model.embed_tokens.weight": table / config.hidden_size**0.5,
    }
    untied = transformers.Gemma3ForCausalLM(config).eval()
    untied.load_state_dict(state)
    return untied


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))


def save_checkpoint(model: torch.nn.Module, cfg: RunConfig, tok: Tokenizer, directory: Path) -> None:
    """A directory hyprec loads: the model and the tokenizer; an encoder without its MLM head, as a
    sentence-transformers model with mean pooling."""
    directory.mkdir(parents=True, exist_ok=True)
    if cfg.family == "gemma3" and not cfg.embed_scale:
        model = _as_scaled_gemma(model)
    (model.bert if cfg.kind == "encoder" else model).save_pretrained(directory)
    save_tokenizer(tok, cfg.kind, directory, cfg.seq_len)
    if cfg.kind == "encoder":
        _write_json(
            directory / "modules.json",
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
        )
        _write_json(directory / "sentence_bert_config.json", {"max_seq_length": cfg.seq_len, "do_lower_case": False})
        pooling = {"word_embedding_dimension": cfg.hidden, "pooling_mode_mean_tokens": True}
        _write_json(directory / "1_Pooling" / "config.json", pooling)


def train(
    cfg: RunConfig,
    stream: torch.Tensor,
    tok: Tokenizer,
    out: Path,
    on_checkpoint: Callable[[int, Path, float], None],
) -> float:
    """Train ``cfg`` and call ``on_checkpoint(step, directory, mean recent loss)`` at each checkpoint step;
    returns the seconds spent training (checkpoint handling excluded)."""
    model = build_model(cfg).train()
    opt = optimizer(cfg, model)
    data = batches(cfg, stream, tok)
    due = set(cfg.checkpoint_steps())
    losses: list[float] = []
    seconds = 0.0
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step - 1)
        loss = model(**next(data)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))
        if step in due:
            directory = checkpoint_dir(out, step)
            save_checkpoint(model.eval(), cfg, tok, directory)
            model.train()
            recent = losses[-max(1, cfg.steps // 20) :]
            on_checkpoint(step, directory, sum(recent) / len(recent))
    return seconds
