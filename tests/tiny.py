"""Tiny random models of every supported family, built from configs (no hub access)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

VOCAB = 99
COMMON = dict(vocab_size=VOCAB)

CONFIGS: dict[str, dict] = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48),
    "mpnet": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "t5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               decoder_start_token_id=0, pad_token_id=0),
    "t5-gated": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                 max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
}
ENCODERS = ("bert", "roberta", "distilbert", "mpnet")
SEQ2SEQ = ("t5", "t5-gated", "bart")
DECODERS = ("gpt2", "opt", "llama", "qwen2", "gpt_neox")
FAMILIES = ENCODERS + SEQ2SEQ + DECODERS

# Families added for issue 17 (tests/test_families.py): the layouts beyond named separate Q/K/V.
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)
_BERT_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64)
CONFIGS.update({
    # one [q | k | v] projection with 2 key/value heads for 4 query heads, one [gate | up] projection
    "phi3": _LLAMA_LIKE,
    # Falcon's three layouts: grouped interleaved (new decoder architecture, 2 KV heads),
    # multi-query [all q | k | v], and per-head [q | k | v] with ALiBi slopes
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True, multi_query=False, alibi=False, bias=True,
                   max_position_embeddings=64, ffn_hidden_size=48),
    "falcon-mq": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                      new_decoder_architecture=False, alibi=False, bias=True, parallel_attn=True,
                      max_position_embeddings=64, ffn_hidden_size=48),
    "falcon-alibi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
                         new_decoder_architecture=False, alibi=True, bias=True, parallel_attn=False,
                         max_position_embeddings=64, ffn_hidden_size=48),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),  # ALiBi, per-head [q | k | v]
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64),  # ALiBi
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, multi_query=True,
                        bos_token_id=1, eos_token_id=2),
    "deberta-v2": dict(**_BERT_LIKE, relative_attention=True, pos_att_type=["p2c", "c2p"],
                       share_att_key=False, position_buckets=8, max_relative_positions=16, pad_token_id=0),
    "modernbert": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2, local_attention=8),
    "mistral": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=8),
    "gemma": dict(_LLAMA_LIKE, head_dim=8, num_key_value_heads=1),  # multi-query, separate projections
    "gemma2": dict(_LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    "phi": dict(_LLAMA_LIKE, num_key_value_heads=4, partial_rotary_factor=0.5),
    "stablelm": dict(_LLAMA_LIKE, num_key_value_heads=4),
    "olmo": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "starcoder2": dict(_LLAMA_LIKE, use_bias=True),
    "electra": dict(_BERT_LIKE, embedding_size=32),
    "xlm-roberta": dict(_BERT_LIKE, pad_token_id=1),
})
NEW_ENCODERS = ("deberta-v2", "modernbert", "electra", "xlm-roberta")
NEW_DECODERS = ("phi3", "falcon", "falcon-mq", "falcon-alibi", "bloom", "mpt", "gpt_bigcode", "mistral",
                "qwen3", "gemma", "gemma2", "phi", "stablelm", "olmo", "cohere", "starcoder2")
NEW_FAMILIES = NEW_ENCODERS + NEW_DECODERS
# family name -> transformers model_type, where they differ
MODEL_TYPES = {"t5-gated": "t5", "falcon-mq": "falcon", "falcon-alibi": "falcon"}


def tiny_config(family: str):
    model_type = MODEL_TYPES.get(family, family)
    return AutoConfig.for_model(model_type, **COMMON, **CONFIGS[family])


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family)
    if family in SEQ2SEQ:
        cls = AutoModelForSeq2SeqLM
    elif family in DECODERS or family in NEW_DECODERS:
        cls = AutoModelForCausalLM
    else:
        cls = AutoModel
    return cls.from_config(config, attn_implementation="eager").eval()


def tiny_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def main_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@torch.no_grad()
def duplicate_group(model: torch.nn.Module, unit, src: int, dst: int) -> None:
    """Make group `dst` of an attention unit an exact copy of group `src` (its query heads' Q rows
    and, unless the key/value head is shared by all (multi-query), its K and V rows; biases and
    per-head positional projections too), and, where heads also own a relative position bias
    (T5, MPNet), copy that bias column too, so the two groups compute the same function."""
    from neuroprune.model.surgery import head_rows, weight_matrix

    q = (unit.query_rows([src]), unit.query_rows([dst]))
    kv = (head_rows([src], unit.head_dim), head_rows([dst], unit.head_dim))
    if unit.qkv is not None:
        fq, fk, fv = unit.fused_rows()
        pairs = [(fq[q[0]], fq[q[1]])]
        if not unit.multi_query:
            pairs += [(fk[kv[0]], fk[kv[1]]), (fv[kv[0]], fv[kv[1]])]
        targets = [(unit.qkv, pairs)]
    else:
        targets = [(unit.q, [q])] + ([] if unit.multi_query else [(unit.k, [kv]), (unit.v, [kv])])
    targets += [(m, [q]) for m in unit.head_projections]
    for module, rows in targets:
        w = weight_matrix(module)
        for s, d in rows:
            w[d] = w[s]
            if module.bias is not None:
                module.bias[d] = module.bias[s]
    for name, module in model.named_modules():
        if name.endswith("relative_attention_bias"):
            module.weight[:, dst] = module.weight[:, src]


def train_with_hooks(model: torch.nn.Module, method, family: str, steps: int, lr: float = 1e-3,
                     offset: float = 0.0) -> None:
    """A plain loop driving every `SparsityMethod` hook, on a task-free loss: the mean of
    (output - offset)^2 over the model's logits (or last hidden state). Ends in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    method.on_train_begin(steps, opt)
    inputs = tiny_inputs(family)
    model.train()
    for step in range(1, steps + 1):
        out = model(**inputs)
        hidden = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        ((hidden - offset).pow(2).mean() + method.regularization_loss()).backward()
        opt.step()
        opt.zero_grad()
        method.on_step_end(step)
    method.on_train_end()
    model.eval()
