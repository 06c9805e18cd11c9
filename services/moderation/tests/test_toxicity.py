from __future__ import annotations

import json

from services.moderation.toxicity import MODEL_FILE, ToxicityModel, features
from services.moderation.training import toxicity_train


def test_features_are_normalised_and_case_blind() -> None:
    a, b = features("Hello World"), features("hello world")
    assert a == b
    assert abs(sum(v * v for v in a.values()) - 1) < 1e-9


def test_model_separates_its_training_data() -> None:
    model = ToxicityModel.load()
    for label, texts in toxicity_train.DATA.items():
        for text in texts:
            scores = model.scores(text)
            if label == "clean":
                assert max(scores.values()) < 0.5, (text, scores)
            else:
                assert scores[label] >= 0.5, (text, scores)


def test_model_file_records_the_data_it_was_trained_on() -> None:
    import hashlib

    training = json.loads(MODEL_FILE.read_text())["training"]
    data = (MODEL_FILE.parent / "training" / training["data"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == training["data_sha256"]
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert rows == toxicity_train.rows()
