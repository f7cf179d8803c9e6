"""The perplexity loop of Hugging Face's guide "Perplexity of fixed-length models" (transformers docs,
docs/source/en/perplexity.md): encodings of "\\n\\n".join(texts), a sliding window of max_length with a
stride, targets masked with -100 outside the window's new part, outputs = model(input_ids, labels=target_ids),
ppl = exp(mean of the windows' losses). Adapted: the import, the model path, a short English text instead of
wikitext-2 (no datasets in CI), numpy for torch ("np", np.exp, np.stack, .copy(); "pt" too where torch is
installed), `.shape[1]` for torch's `.size(1)` (it works with both), and a scaled-down window (24/12) besides the
guide's (max_position_embeddings/512) so that the stride loop runs more than once on the short text.
The result must equal a perplexity computed independently in numpy from model(input_ids).logits."""
import numpy as np
import pytest

import fastload as transformers

TEXTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
    "Paris. Its base is square, measuring 125 metres on each side.",
    "It was the first structure to reach a height of 300 metres.",
]


def guide_perplexity(model, tokenizer, tensors, max_length, stride, device="cpu"):
    encodings = tokenizer("\n\n".join(TEXTS), return_tensors=tensors.name)
    seq_len = encodings.input_ids.shape[1]

    nlls, windows = [], []
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        if tensors.name == "pt":
            input_ids = input_ids.to(device)
        target_ids = tensors.clone(input_ids)
        target_ids[:, :-trg_len] = -100

        with tensors.no_grad():
            outputs = model(input_ids, labels=target_ids)

            # loss is calculated using CrossEntropyLoss which averages over valid labels
            # N.B. the model only calculates loss over trg_len - 1 labels, because it internally shifts the labels
            # to the left by 1.
            neg_log_likelihood = outputs.loss

        nlls.append(neg_log_likelihood)
        windows.append((np.asarray(input_ids), np.asarray(target_ids)))

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    ppl = tensors.exp(tensors.stack(nlls).mean())
    return ppl, windows, seq_len


def numpy_perplexity(model, windows):
    """The same quantity from the logits alone: per window, the mean of -log softmax at the next token over the
    positions whose (shifted) target is not -100; then exp of the mean over windows."""
    nlls = []
    for input_ids, target_ids in windows:
        logits = np.asarray(model(input_ids).logits, dtype=np.float64)[0, :-1]
        target = target_ids[0, 1:]
        keep = target != -100
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nlls.append(-logp[np.arange(len(target)), np.where(keep, target, 0)][keep].mean())
    return float(np.exp(np.mean(nlls)))


@pytest.mark.parametrize("window", ["guide", "small"])
def test_perplexity_loop(model, tokenizer, tensors, window):
    max_length, stride = (model.config.max_position_embeddings, 512) if window == "guide" else (24, 12)
    ppl, windows, seq_len = guide_perplexity(model, tokenizer, tensors, max_length, stride)
    assert seq_len > 40
    assert len(windows) == (1 if window == "guide" else -(-(seq_len - 24) // 12) + 1)
    ppl = tensors.item(ppl)
    want = numpy_perplexity(model, windows)
    assert np.isfinite(ppl) and 1 < ppl < 1000
    assert ppl == pytest.approx(want, rel=1e-4)
