"""Lab data: the Bigram-Backcopy task, the packing collator, and natural-text sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.lab import data
from sinkscope.lab.models import ModelSpec, build_model

SOURCE = data.BigramBackcopy(vocab=24, triggers=3, doc_length=(6, 20), concentration=0.3, world_seed=1)


def test_bigram_backcopy_follows_its_rules():
    rng = np.random.default_rng(0)
    counts = np.zeros((24, 24))
    for _ in range(300):
        doc = np.asarray(SOURCE.document(rng)) - SOURCE.offset
        assert 6 <= len(doc) <= 20 and doc.min() >= 0 and doc.max() < 24
        for i in range(2, len(doc)):
            if doc[i - 1] < 3:  # after a trigger: the token before the trigger, always
                assert doc[i] == doc[i - 2]
            else:
                counts[doc[i - 1], doc[i]] += 1
    # elsewhere the bigram chain: empirical transitions track the true ones
    rows = counts.sum(1) > 200
    empirical = counts[rows] / counts[rows].sum(1, keepdims=True)
    assert np.abs(empirical - SOURCE.transitions[rows]).max() < 0.15


@pytest.mark.parametrize("bos", data.BOS_MODES)
@pytest.mark.parametrize("mask", data.MASKS)
def test_windows_are_packed_as_configured(mask, bos):
    packing = data.Packing(mask, bos)
    batch = data.make_batch(SOURCE, 3, 5, range(6), 48, packing)
    ids, seg = batch.input_ids.numpy(), batch.segments.numpy()
    assert ids.shape == (6, 48)
    if bos == "fixed":
        assert (ids[:, 0] == SOURCE.bos_id).all() and (seg[:, 0] == -1).all()
        assert (ids[:, 1:] != SOURCE.bos_id).all()  # the only <bos> is the pinned one
    elif bos == "eos":
        starts = np.r_[False, (seg[0, 1:] != seg[0, :-1])]
        assert (ids[0][starts] == SOURCE.bos_id).all()  # every later document opens with <bos>
    else:
        assert (ids != SOURCE.bos_id).all()  # no <bos> anywhere
    # documents end with <eos> where they change
    ends = seg[:, 1:] != seg[:, :-1]
    ends[:, 0] &= seg[:, 0] != -1
    assert (ids[:, :-1][ends] == SOURCE.eos_id).all()
    if mask == "causal":
        assert batch.attention_mask is None
        assert (batch.position_ids.numpy() == np.arange(48)).all()
    else:
        allowed = batch.attention_mask[:, 0].numpy()
        for row in range(6):
            for i in range(48):
                for j in range(48):
                    expected = j <= i and (seg[row, i] == seg[row, j] or (bos == "fixed" and j == 0))
                    assert allowed[row, i, j] == expected
        # labels never cross a document boundary under intra-document masking
        assert (batch.labels.numpy()[:, :-1][ends] == -100).all()


def test_rows_are_a_function_of_seed_step_and_row():
    packing = data.Packing("intra_doc", "fixed")
    whole = data.make_batch(SOURCE, 0, 9, range(8), 32, packing)
    halves = [data.make_batch(SOURCE, 0, 9, range(0, 4), 32, packing),
              data.make_batch(SOURCE, 0, 9, range(4, 8), 32, packing)]
    torch.testing.assert_close(whole.input_ids, torch.cat([h.input_ids for h in halves]))
    torch.testing.assert_close(whole.attention_mask, torch.cat([h.attention_mask for h in halves]))
    other = data.make_batch(SOURCE, 0, 10, range(8), 32, packing)
    assert not torch.equal(whole.input_ids, other.input_ids)


@pytest.mark.parametrize("variant", ["softmax", "off_by_one"])
@pytest.mark.parametrize("bos", data.BOS_MODES)
def test_intra_document_mask_equals_running_documents_separately(bos, variant):
    model = build_model(ModelSpec(hidden_size=32, layers=2, heads=4, attention=variant), SOURCE.vocab_size, 64,
                        SOURCE.bos_id, SOURCE.eos_id, seed=0).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    batch = data.make_batch(SOURCE, 1, 2, range(3), 64, data.Packing("intra_doc", bos))
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask).logits
        checked = 0
        for row in range(3):
            seg = batch.segments[row]
            for segment in seg.unique().tolist():
                if segment == -1:
                    continue
                where = (seg == segment).nonzero()[:, 0]
                alone = batch.input_ids[row, where]
                if bos == "fixed":  # the pinned <bos> is part of every document's context
                    alone = torch.cat([torch.tensor([SOURCE.bos_id]), alone])
                logits = model(input_ids=alone[None]).logits[0]
                torch.testing.assert_close(packed[row, where], logits[-len(where):], atol=2e-5, rtol=1e-4)
                checked += 1
    assert checked >= 6
    # and causal packing does mix documents: the same tokens give other logits
    with torch.no_grad():
        mixed = model(input_ids=batch.input_ids).logits
    assert not torch.allclose(mixed, packed, atol=1e-3)


def test_probe_documents_and_inference_inputs():
    probes = data.probe_documents(SOURCE, 5, 10, seed=4)
    assert probes == data.probe_documents(SOURCE, 5, 10, seed=4)
    assert all(len(p) == 10 and SOURCE.bos_id not in p for p in probes)
    with_bos = data.with_inference_input(probes, "bos+text", SOURCE.bos_id)
    assert all(p[0] == SOURCE.bos_id and p[1:] == q for p, q in zip(with_bos, probes, strict=True))
    assert data.with_inference_input(probes, "text", SOURCE.bos_id) == probes
    with pytest.raises(data.LabDataError):
        data.with_inference_input(probes, "bos", SOURCE.bos_id)
    with pytest.raises(data.LabDataError):
        data.probe_documents(SOURCE, 3, 50, seed=0)  # documents are at most 20 tokens


def test_text_source_trains_a_tokenizer_and_holds_out_documents(tmp_path):
    paragraphs = [f"Paragraph {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs again and again."
                  for i in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs[:30]))
    (tmp_path / "b.txt").write_text("\n\n".join(paragraphs[30:]))
    corpus = data.text_source([str(tmp_path)], "train:300")
    train, validation = corpus.split("train"), corpus.split("validation")
    assert len(train.docs) + len(validation.docs) == 60 and len(validation.docs) == 3
    tokenizer = corpus.tokenizer()
    assert tokenizer.decode(train.docs[0]) in paragraphs
    batch = data.make_batch(train, 0, 0, range(2), 40, data.Packing("causal", "eos"))
    assert batch.input_ids.max() < corpus.vocab_size
    with pytest.raises(data.LabDataError):
        data.text_source([str(tmp_path / "missing")])


def test_text_source_reads_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"Row {i}: a short document about the number {i} and its {i % 5} neighbours in the list." for i in
            range(40)]
    datasets.Dataset.from_dict({"text": rows, "id": list(range(40))}).save_to_disk(str(tmp_path / "saved"))
    corpus = data.text_source([], "train:300", dataset=str(tmp_path / "saved"))
    assert len(corpus.all) == 40
    assert corpus.tokenizer().decode(corpus.all[7]) == rows[7]
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(data.LabDataError, match="no 'text' column"):
        data.text_source([], "train:300", dataset=str(tmp_path / "other"))
