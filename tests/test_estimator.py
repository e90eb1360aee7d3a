"""The estimator: exact perturbation, per-example differences, and what they estimate."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from conftest import batch_of, make_task
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.perturb import Perturbation, unreached_parameters
from seedtune.common.tasks import evaluate
from seedtune.common.trainable import DirectionField, TrainableSet

TASKS = ["sequence-classification", "prompt-classification", "causal-lm"]


def masked(module: nn.Module, every: int = 7) -> dict:
    """Every tensor, some in full and some at every ``every``-th coordinate."""
    mask = {}
    for position, (name, param) in enumerate(module.named_parameters()):
        mask[name] = None if position % 2 else torch.arange(position % min(every, param.numel()), param.numel(), every)
    return mask


def materialized(module: nn.Module, trainable: TrainableSet, field: DirectionField, seed: int, shift: float):
    """A copy of ``module`` whose weights ARE theta + shift * z: the slow, obvious oracle."""
    twin = copy.deepcopy(module)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for entry in trainable:
            flat = params[entry.name].view(-1)
            step = field.fill(entry, seed, torch.empty(entry.size, dtype=flat.dtype)).mul_(shift)
            if entry.index is None:
                flat.copy_(flat + step)
            else:
                flat[entry.index] = flat[entry.index] + step
    return twin


@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.parametrize("layout", ["full", "masked"])
def test_perturbed_forward_equals_forward_of_materialized_weights(kind, layout, synthetic):
    task = make_task(kind)
    trainable = TrainableSet(task.module, masked(task.module)) if layout == "masked" else TrainableSet.everything(task.module)
    field = DirectionField(trainable, "gaussian")
    batch = batch_of(task, synthetic)
    perturbation = Perturbation(task.module, trainable, field)
    for shift in (1e-2, -1e-2):
        with perturbation.shifted(42, shift):
            hooked = task.per_example_loss(task.module, batch)
        oracle = task.per_example_loss(materialized(task.module, trainable, field, 42, shift), batch)
        assert torch.equal(hooked, oracle)
    assert not torch.equal(hooked, task.per_example_loss(task.module, batch))  # it did perturb


@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # a half-precision model restores exactly too
def test_weights_are_bit_identical_after_an_estimate(kind, dtype, synthetic):
    task = make_task(kind, dtype)
    before = {name: t.clone() for name, t in task.module.state_dict().items()}
    for mask in (None, masked(task.module)):
        trainable = TrainableSet.everything(task.module) if mask is None else TrainableSet(task.module, mask)
        field = DirectionField(trainable, "rademacher")
        estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field)
        estimator.estimate(batch_of(task, synthetic), 6, [1, 2, 3], 0.05)
    after = task.module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(isinstance(p, nn.Parameter) for p in task.module.parameters())


def test_weights_are_restored_when_the_forward_fails(synthetic):
    task = make_task("sequence-classification")
    before = {name: t.clone() for name, t in task.module.state_dict().items()}
    trainable = TrainableSet(task.module, masked(task.module))
    perturbation = Perturbation(task.module, trainable, DirectionField(trainable, "rademacher"))
    layer = task.module.bert.encoder.layer[1].output.dense
    handle = layer.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), perturbation.shifted(3, 0.5):
        task.per_example_loss(task.module, batch_of(task, synthetic))
    handle.remove()
    after = task.module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert isinstance(layer.weight, nn.Parameter)


@pytest.mark.parametrize("kind", TASKS)
def test_batched_differences_equal_a_loop_over_single_examples(kind, synthetic):
    task = make_task(kind, torch.float64)
    trainable = TrainableSet.everything(task.module)
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, DirectionField(trainable, "gaussian"))
    rows = synthetic.train[:5]
    batched = estimator.estimate(task.encode(rows["text"], rows["label"]), 5, [7, 8], 1e-3).differences
    single = torch.cat([
        estimator.estimate(task.encode([text], [label]), 1, [7, 8], 1e-3).differences
        for text, label in zip(rows["text"], rows["label"])
    ])
    alone = estimator.estimate_examples(task, rows["text"], rows["label"], [7, 8], 1e-3).differences
    assert batched.shape == alone.shape == (5, 2)
    assert torch.allclose(batched, single, rtol=1e-7, atol=1e-9)
    assert torch.equal(alone, single)  # each example alone, whatever path runs the loop


# -- one example more or less leaves every other row bit for bit -------------------------------
# The sensitivity the accountant charges assumes it: a row that moved by one ulp of a loss moves
# by ulp / (2 beta) in the difference, which at small beta exceeds the clip bound.

def neighbours(texts, labels, long, short):
    """Samples one example away from (texts, labels): the longest or the shortest example added,
    and one of the sample's own removed, at the start, in the middle and at the end. Each comes
    with ``shared``: (position in the sample, position in the neighbour) of the examples both hold."""
    n = len(texts)
    for extra_text, extra_label in (long, short):
        for at in (0, n // 2, n):
            yield (texts[:at] + [extra_text] + texts[at:], labels[:at] + [extra_label] + labels[at:],
                   [(i, i if i < at else i + 1) for i in range(n)])
    for at in (0, n // 2, n - 1):  # the examples after it move up one position
        yield (texts[:at] + texts[at + 1 :], labels[:at] + labels[at + 1 :],
               [(i, i if i < at else i - 1) for i in range(n) if i != at])


def slots(task, texts, labels, micro_batch):
    """Each example's row within its micro-batch."""
    row_of = {i: row for _, held in task.encode_fixed(texts, labels, micro_batch) for row, i in enumerate(held)}
    return [row_of[i] for i in range(len(texts))]


def assert_rows_independent_of_neighbours(task, estimator, texts, labels, long, short, probe_seeds):
    before, moved = slots(task, texts, labels, estimator.micro_batch), 0
    for beta in (1e-3, 1e-7):
        rows = estimator.estimate_examples(task, texts, labels, probe_seeds, beta).differences
        assert torch.isfinite(rows).all() and rows.abs().max() > 0
        for other_texts, other_labels, shared in neighbours(texts, labels, long, short):
            other = estimator.estimate_examples(task, other_texts, other_labels, probe_seeds, beta).differences
            mine, theirs = zip(*shared)
            assert torch.equal(other[list(theirs)], rows[list(mine)]), (beta, other_texts)
            after = slots(task, other_texts, other_labels, estimator.micro_batch)
            moved += sum(before[i] != after[j] for i, j in shared)
    assert moved > 0 or estimator.micro_batch == 1  # micro-batches: rows moved to other positions


def lengths(task, texts):
    return [task.encode_example(text)["input_ids"].shape[1] for text in texts]


@pytest.mark.parametrize("kind", TASKS)
def test_an_example_is_tokenized_once_and_its_encoding_is_the_same(kind, synthetic, monkeypatch):
    task = make_task(kind)
    text, label = synthetic.train[3]["text"], synthetic.train[3]["label"]
    fresh = task.encode([text], [label])
    calls = []
    tokenize = type(task.tokenizer).__call__
    monkeypatch.setattr(type(task.tokenizer), "__call__", lambda *a, **k: calls.append(a) or tokenize(*a, **k))
    first = task.encode_example(text, label)
    first["input_ids"] = None  # a caller's own dict: changing it leaves the kept encoding alone
    tokenized = len(calls)  # an instruction task tokenizes the prompt and the answer apart
    second = task.encode_example(text, label)
    assert tokenized >= 1 and len(calls) == tokenized
    assert second.keys() == fresh.keys() and all(torch.equal(second[k], fresh[k]) for k in fresh)
    task.template = "Review: {text}"  # another prompt is another encoding
    assert not torch.equal(task.encode_example(text, label)["input_ids"], fresh["input_ids"])


MICRO_BATCHES = [1, 4]  # each example alone; fixed-shape micro-batches of 4 rows, positions varying


@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.slow
def test_an_added_or_removed_example_leaves_every_other_row_bit_for_bit(kind, micro_batch, synthetic):
    task = make_task(kind)  # causal-lm: instruction tuning (the answer after the prompt is scored)
    trainable = TrainableSet.everything(task.module)
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable,
                                     DirectionField(trainable, "rademacher"), micro_batch=micro_batch)
    texts, labels = list(synthetic.train[10:16]["text"]), list(synthetic.train[10:16]["label"])
    long = (" ".join(synthetic.train[16:20]["text"]), 1)  # truncated to max_length: the widest there is
    short = ("great", 1)
    assert min(lengths(task, texts)) > lengths(task, [short[0]])[0]
    assert max(lengths(task, texts)) < lengths(task, [long[0]])[0] == task.max_length
    assert_rows_independent_of_neighbours(task, estimator, texts, labels, long, short, [3, 4])


@pytest.mark.parametrize("keep", [0, 64], ids=["per-batch", "kept"])
@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
def test_language_modelling_rows_with_a_frozen_prefix_are_independent_of_neighbours(micro_batch, keep, synthetic):
    task = make_task("causal-lm")
    task.template = "{text}"  # plain language modelling: every token counts
    trainable = TrainableSet(task.module, top_layer_mask(task.module))  # a frozen prefix
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable,
                                     DirectionField(trainable, "rademacher"), micro_batch=micro_batch,
                                     keep_prefix_mib=keep)  # kept: neighbours' rows replayed from the store
    texts, labels = list(synthetic.train[:5]["text"]), list(synthetic.train[:5]["label"])
    assert_rows_independent_of_neighbours(task, estimator, texts, labels,
                                          (" ".join(synthetic.train[5:9]["text"]), 0), ("w1 w2", 0), [3])


REVIEWS = [
    "a gripping, beautiful film that earns every one of its quiet moments",
    "dull and far too long",
    "the cast is wonderful, but the script never decides what kind of movie it wants to be",
    "an utterly charming comedy",
    "a mess of a thriller, with twists you can see coming from the opening credits and a finale "
    "that mistakes noise for tension",
]
LONG_REVIEW = ("for all its ambition and the evident care lavished on its production design, costumes and score, "
               "this sprawling historical epic never finds a pulse: its characters speak in speeches, its battles "
               "blur together, and by the third hour even its most committed admirers will be checking their watches, "
               "wondering why nobody in the editing room had the courage to cut it by half")


@pytest.fixture(scope="module")
def minilm():
    from seedtune.common.tasks import load_task

    return load_task("minilm", "sequence-classification", ("negative", "positive"), max_length=64, head_scale=20.0)


@pytest.mark.parametrize("keep", [0, 64], ids=["per-batch", "kept"])
@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
@pytest.mark.models
def test_minilm_default_rows_are_independent_of_neighbours(minilm, micro_batch, keep):
    """The default preset's model and trainable set (the cosine head, the encoder a recorded
    prefix, per batch or kept per example across calls)."""
    task = minilm
    trainable = TrainableSet(task.module, {"classifier.weight": None, "classifier.bias": None})
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable,
                                     DirectionField(trainable, "rademacher"), micro_batch=micro_batch,
                                     keep_prefix_mib=keep)
    labels = [1, 0, 0, 1, 0]
    assert lengths(task, [LONG_REVIEW]) == [64] and lengths(task, ["bad."])[0] < min(lengths(task, REVIEWS))
    assert_rows_independent_of_neighbours(task, estimator, REVIEWS, labels, (LONG_REVIEW, 0), ("bad.", 0),
                                          [1, 2, 3, 4, 5, 6, 7, 8])
    assert estimator.prefix.modules  # the encoder ran once per batch, the head 2K times


@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
@pytest.mark.parametrize("kind", TASKS)
def test_private_evaluation_counts_a_set_as_the_sum_of_its_examples_on_their_own(kind, micro_batch, synthetic):
    """A released count's sensitivity of 1 needs each example's result to ignore the others."""
    task = make_task(kind)
    examples = synthetic.validation.select(range(9))
    whole = evaluate(task, examples, micro_batch=micro_batch)
    each = [evaluate(task, examples.select([j]), micro_batch=micro_batch) for j in range(9)]
    assert whole["loss"] == pytest.approx(sum(m["loss"] for m in each) / 9, rel=1e-6)
    if task.classifies:
        assert round(whole["accuracy"] * 9) == sum(round(m["accuracy"]) for m in each)


def top_layer_mask(module: nn.Module) -> dict:
    """Every third coordinate of the last block and the head: where SynFlow masks concentrate."""
    params = dict(module.named_parameters())
    blocks = {name: int(m.group(1)) for name in params if (m := re.search(r"\.layers?\.(\d+)\.", name))}
    last = max(blocks.values())
    chosen = [name for name in params if blocks.get(name) == last or name.startswith("classifier")]
    return {name: torch.arange(0, params[name].numel(), 3) for name in chosen}


@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.parametrize("layout", ["top", "full"])
def test_computing_the_frozen_prefix_once_changes_no_bit(kind, layout, synthetic):
    task = make_task(kind)
    trainable = TrainableSet(task.module, top_layer_mask(task.module)) if layout == "top" else TrainableSet.everything(task.module)
    field = DirectionField(trainable, "rademacher")
    batch = batch_of(task, synthetic)
    cached = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field)
    plain = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, cache_prefix=False)
    first = cached.estimate(batch, 6, [1, 2, 3], 1e-2)
    reference = plain.estimate(batch, 6, [1, 2, 3], 1e-2)
    assert torch.equal(first.differences, reference.differences)
    assert first.loss == reference.loss  # the mean of the same perturbed losses
    rows = synthetic.train[:6]  # one recording per example, replayed in every perturbed pass
    first, reference = (estimator.estimate_examples(task, rows["text"], rows["label"], [1, 2], 1e-2)
                        for estimator in (cached, plain))
    assert torch.equal(first.differences, reference.differences)
    if layout == "top":
        assert cached.prefix.modules  # the embeddings and the first block(s) were skipped
        other = batch_of(task, synthetic, size=4, offset=10)  # a new batch: nothing stale is reused
        assert torch.equal(cached.estimate(other, 4, [5], 1e-2).differences,
                           plain.estimate(other, 4, [5], 1e-2).differences)
    else:
        assert cached.prefix.modules == []


@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
@pytest.mark.parametrize("kind", TASKS)
def test_prefix_outputs_kept_across_calls_change_no_bit(kind, micro_batch, synthetic):
    """Samples that overlap, in other orders and micro-batch positions: the rows replayed from the
    store equal those of an estimator that computes everything afresh."""
    task = make_task(kind)
    trainable = TrainableSet(task.module, top_layer_mask(task.module))
    field = DirectionField(trainable, "rademacher")
    kept = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, micro_batch=micro_batch,
                                keep_prefix_mib=64)
    plain = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, micro_batch=micro_batch,
                                 cache_prefix=False)
    rows = synthetic.train[:14]
    samples = [list(range(8)), [7, 3, 0, 5, 1, 6, 2, 4], list(range(4, 12)), [13, 0, 12, 2]]
    computed = []
    for sample in samples:
        texts, labels = [rows["text"][i] for i in sample], [rows["label"][i] for i in sample]
        ours, theirs = (estimator.estimate_examples(task, texts, labels, [3, 4], 1e-3) for estimator in (kept, plain))
        assert torch.equal(ours.differences, theirs.differences)
        assert ours.loss == theirs.loss
        computed.append(kept.store.kept_rows)
    assert computed[0] >= 8  # the first sample's examples (and, in micro-batches, a filler row per width)
    assert computed[1] == computed[0]  # the same examples in another order: nothing computed again
    assert computed[3] > computed[2] > computed[1]  # batches holding examples not seen before
    assert kept.store.hits > 0 and kept.store.misses > 0


def test_the_store_keeps_nothing_past_its_budget_and_still_answers_exactly(synthetic):
    task = make_task("sequence-classification")
    trainable = TrainableSet(task.module, top_layer_mask(task.module))
    field = DirectionField(trainable, "rademacher")
    plain = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, cache_prefix=False)
    rows = synthetic.train[:6]
    one = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, keep_prefix_mib=1e-6)
    first = one.estimate_examples(task, rows["text"], rows["label"], [1], 1e-3)
    assert len(one.store) == 0 and one.store.used_bytes == 0  # 1 byte holds no example
    assert one.store.misses > 0  # computed per batch instead
    assert torch.equal(first.differences,
                       plain.estimate_examples(task, rows["text"], rows["label"], [1], 1e-3).differences)
    roomy = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, keep_prefix_mib=64)
    roomy.estimate_examples(task, rows["text"][:1], rows["label"][:1], [1], 1e-3)
    budget = roomy.store.used_bytes * 3 + 1  # room for exactly three examples of that size or less
    tight = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field, keep_prefix_mib=budget / 2**20)
    tight.estimate_examples(task, rows["text"], rows["label"], [1], 1e-3)
    assert 0 < len(tight.store) < 6 and tight.store.used_bytes <= budget


def test_outputs_without_a_row_per_example_turn_the_store_off():
    from seedtune.common.prefix import RecordingStore

    module = nn.Linear(2, 2)
    store = RecordingStore(2**20)
    assert store.keep([b"a", b"b"], {module: [(torch.zeros(2, 3), torch.zeros(4))]}) is False  # 4 rows of 2?
    assert len(store) == 0
    table = torch.ones(1, 5)  # one row shared by all (a rotary table)
    assert store.keep([b"a", b"b"], {module: [(torch.arange(6.0).view(2, 3), table, None)]}) is True
    rows, shared, _ = store.lookup([b"b", b"a"])[module][0]
    assert torch.equal(rows, torch.tensor([[3.0, 4, 5], [0, 1, 2]])) and shared is table
    assert store.lookup([b"a", b"c"]) is None
    assert store.keep([b"c", b"d"], {module: [(torch.zeros(2, 3), torch.zeros(1, 5), None)]}) is True
    assert store.lookup([b"a", b"c"]) is None  # their shared tables differ: not joined
    assert store.hits == 1 and store.misses == 2


class Chain(nn.Module):
    """Two frozen maps and a trainable one; with ``skip`` the tail also reads the first map's output."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip = skip
        self.first, self.second, self.tail = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        a = self.first(x)
        out = self.tail(torch.tanh(self.second(a)))
        return (out + a.sum(dim=1, keepdim=True) if self.skip else out).squeeze(1)


@pytest.mark.parametrize("skip", [False, True], ids=["chain", "skip"])
def test_only_the_prefix_outputs_the_rest_reads_are_kept(skip):
    """An output read only by the next frozen module (which a replay does not run) is kept as its
    shape alone; one the trainable rest reads (a skip connection) is kept whole. Both answer
    bit for bit what a fresh pass computes."""
    torch.manual_seed(0)
    model = Chain(skip)
    trainable = TrainableSet(model, {"tail.weight": None, "tail.bias": None})
    field = DirectionField(trainable, "rademacher")
    batch = {"x": torch.randn(5, 3)}
    loss = lambda module, b: module(b["x"]) ** 2  # noqa: E731 - per-example loss of the toy model
    cached = ZerothOrderEstimator(model, loss, trainable, field)
    plain = ZerothOrderEstimator(model, loss, trainable, field, cache_prefix=False)
    assert torch.equal(cached.estimate(batch, 5, [1, 2], 1e-3).differences,
                       plain.estimate(batch, 5, [1, 2], 1e-3).differences)
    assert cached.prefix.modules == [model.first, model.second]
    assert cached.prefix.unread == (set() if skip else {model.first})
    recording = cached.prefix.record(lambda: loss(model, batch))
    assert isinstance(recording[model.first][0], torch.Tensor) is skip
    assert isinstance(recording[model.second][0], torch.Tensor)


def test_an_unread_output_that_is_read_after_all_reaches_the_loss_as_nan():
    """The safety net: were the trace wrong about a read, the replay gives NaN, not a wrong loss."""
    torch.manual_seed(0)
    model = Chain(skip=False)
    trainable = TrainableSet(model, {"tail.weight": None, "tail.bias": None})
    estimator = ZerothOrderEstimator(model, lambda m, b: m(b["x"]) ** 2, trainable, DirectionField(trainable, "rademacher"))
    batch = {"x": torch.randn(4, 3)}
    estimator.estimate(batch, 4, [1], 1e-3)
    recording = estimator.prefix.record(lambda: model(batch["x"]))
    model.skip = True  # now the rest reads the output the trace found unread
    with estimator.prefix.replaying(recording):
        assert torch.isnan(model(batch["x"])).all()


@pytest.mark.models
def test_the_default_store_keeps_the_sentence_embedding_not_the_token_states(minilm):
    """Head-only: the encoder's token states are read only by the pooling, itself replayed, so a
    kept example costs its 384 pooled values."""
    task = minilm
    trainable = TrainableSet(task.module, {"classifier.weight": None, "classifier.bias": None})
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable,
                                     DirectionField(trainable, "rademacher"), micro_batch=1, keep_prefix_mib=64)
    estimator.keep_prefixes(task, REVIEWS, [1, 0, 0, 1, 0][: len(REVIEWS)])
    assert len(estimator.store) == len(set(REVIEWS))
    assert estimator.store.used_bytes == len(estimator.store) * task.module.config.hidden_size * 4


@pytest.mark.parametrize("kind", TASKS)
def test_the_prefix_is_computed_once_and_the_rest_only_in_the_perturbed_passes(kind, synthetic):
    task = make_task(kind)
    trainable = TrainableSet(task.module, top_layer_mask(task.module))
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable,
                                     DirectionField(trainable, "rademacher"))
    batch = batch_of(task, synthetic)
    estimator.estimate(batch, 6, [1], 1e-2)  # traces the plan
    # Inside a prefix module (replay replaces its forward, so its children no longer run).
    first_prefix = next(child for m in estimator.prefix.modules for child in m.modules() if child is not m)
    after = [m for m in task.module.modules() if m in estimator.prefix._owns_trainable][0]
    calls = {first_prefix: 0, after: 0}
    handles = [m.register_forward_pre_hook(lambda m, a: calls.__setitem__(m, calls[m] + 1)) for m in calls]
    try:
        estimator.estimate(batch, 6, [1, 2, 3], 1e-2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[first_prefix] == 1  # recorded once, replayed 6 times without running
    assert calls[after] == 6  # 2K perturbed passes, no clean pass over the trainable part


def test_empty_batch_gives_zero_differences():
    task = make_task("sequence-classification")
    trainable = TrainableSet.everything(task.module)
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, DirectionField(trainable, "rademacher"))
    assert torch.equal(estimator.estimate({}, 0, [1, 2], 0.1).differences, torch.zeros(0, 2, dtype=torch.float64))
    assert torch.equal(estimator.estimate_examples(task, [], [], [1, 2], 0.1).differences,
                       torch.zeros(0, 2, dtype=torch.float64))


class Quadratic(nn.Module):
    """l_i(theta) = 1/2 (theta - x_i)^T A (theta - x_i): gradient A (theta - x_i) in closed form."""

    def __init__(self, dim: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        root = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("a", root @ root.T / dim + torch.eye(dim, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))

    def forward(self, x):  # parameters are read inside their module's forward: the contract
        delta = self.theta - x
        return 0.5 * ((delta @ self.a) * delta).sum(dim=1)

    @staticmethod
    def loss(module, batch):
        return module(batch["x"])


def zo_gradient(estimator, batch, size, probes, beta, trainable, field):
    seeds = list(range(1000, 1000 + probes))
    projected = estimator.estimate(batch, size, seeds, beta).differences.mean(dim=0)
    parts = []
    for entry in trainable:
        z = torch.stack([field.fill(entry, seed, torch.empty(entry.size, dtype=torch.float64)) for seed in seeds])
        parts.append((projected.unsqueeze(1) * z).mean(dim=0))
    return torch.cat(parts)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.slow
def test_zo_gradient_of_a_quadratic_approaches_the_true_gradient(distribution):
    model = Quadratic(12)
    x = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trainable = TrainableSet.everything(model)
    field = DirectionField(trainable, distribution)
    estimator = ZerothOrderEstimator(model, model.loss, trainable, field)
    true = (model.a @ (model.theta.detach() - x).T).T.mean(dim=0)
    errors = [
        (zo_gradient(estimator, {"x": x}, 8, k, 1e-3, trainable, field) - true).norm() / true.norm()
        for k in (20, 4000)
    ]
    assert errors[1] < 0.12
    assert errors[1] < errors[0] / 4  # error ~ sqrt(d / K)


@pytest.mark.slow
def test_zo_gradient_of_a_small_network_matches_autograd(synthetic):
    task = make_task("sequence-classification", torch.float64)
    names = ["classifier.weight", "classifier.bias", "bert.encoder.layer.1.output.LayerNorm.weight",
             "bert.embeddings.token_type_embeddings.weight"]
    trainable = TrainableSet(task.module, {name: None for name in names})
    field = DirectionField(trainable, "rademacher")
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable, field)
    batch = batch_of(task, synthetic, size=8)
    params = dict(task.module.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    with torch.enable_grad():
        task.per_example_loss(task.module, batch).mean().backward()
    true = torch.cat([params[entry.name].grad.reshape(-1) for entry in trainable])  # canonical order
    estimate = zo_gradient(estimator, batch, 8, 1500, 1e-5, trainable, field)
    # d = 162 coordinates, K = 1500 probes: relative error ~ sqrt(d / K) ~ 0.33
    assert torch.nn.functional.cosine_similarity(estimate, true, dim=0) > 0.85


def test_tensors_a_forward_never_reaches_are_found(synthetic):
    task = make_task("sequence-classification")
    task.module.unused = nn.Linear(3, 3)
    trainable = TrainableSet.everything(task.module)
    batch = batch_of(task, synthetic)
    unused = unreached_parameters(task.module, trainable, lambda: task.per_example_loss(task.module, batch))
    assert unused == ["unused.weight", "unused.bias"]


def test_a_silo_computes_its_shard_ahead_a_bounded_time_per_answer(synthetic, monkeypatch):
    """A large shard's prefix pass is spread over answers (one chunk each when the time is up at
    once), resumes where it stopped, is kept per micro-batch size, and stops at a full store."""
    from seedtune.client import silo as silo_module
    from seedtune.client.silo import Silo
    from seedtune.common.privacy.randomness import PublicRandomness

    monkeypatch.setattr(silo_module, "PREFIX_CHUNK", 8)
    task = make_task("sequence-classification")
    trainable = TrainableSet(task.module, top_layer_mask(task.module))
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, trainable,
                                     DirectionField(trainable, "rademacher"), keep_prefix_mib=64)
    shard = synthetic.train.select(range(20))
    silo = Silo(task, estimator, shard, PublicRandomness(0), None)
    silo.prefix_seconds = 0.0
    kept = []
    for _ in range(4):
        silo._keep_prefixes(2)
        kept.append(estimator.store.kept_rows)
    assert kept[0] > 0 and kept[0] < kept[1] < kept[2] == kept[3]  # 8, 16, then the last 4 rows; done
    assert silo._prefix_done == {2: 20}
    silo.prefix_seconds = 60.0
    silo._keep_prefixes(4)  # another micro-batch size: its own pass, whole within the time
    assert silo._prefix_done == {2: 20, 4: 20}
    estimator.store.budget_bytes = estimator.store.used_bytes  # full: the next size stops at once
    before = estimator.store.kept_rows
    silo._keep_prefixes(1)
    assert silo._prefix_done[1] == 20 and estimator.store.kept_rows == before
