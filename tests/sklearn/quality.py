"""How well a model shoal fitted predicts later data (docs/performance.md).

    python3 tests/sklearn/quality.py models.json NAME next.examples.json

`models.json` is `GET /models` of a run stopped (`--until`) at refresh r;
`next.examples.json` is `GET /models/NAME/examples` of a run stopped at the
next refresh: examples the fit in force at r never saw (their labels matured
after it). Prints the AUC on them of (a) the base rate (a constant: 0.5),
(b) shoal's fit, and (c) the same logistic regression fitted offline on
those very examples (in-sample: what this model family can do at best).
"""
import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

models, name, path = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
model = next(m for m in models["models"] if m["name"] == name)
data = json.load(open(path))
x = np.array([e["x"] for e in data["examples"]], dtype=float)
y = np.array([e["y"] for e in data["examples"]], dtype=int)
eta = np.full(len(y), model["intercept"])
for j, f in enumerate(model["features"]):
    if f["weight"] is not None:
        eta += f["weight"] * (x[:, j] - f["mean"]) / f["scale"]
online = roc_auc_score(y, eta)
kept = [j for j in range(x.shape[1]) if not np.all(x[:, j] == x[0, j])]
z = (x[:, kept] - x[:, kept].mean(axis=0)) / x[:, kept].std(axis=0)
offline = LogisticRegression(C=1.0 / data["l2"], solver="newton-cholesky", tol=1e-12).fit(z, y)
print(json.dumps({
    "model": name, "fitted_at": model["fitted_at"], "scored_on": data["time"],
    "examples": int(len(y)), "positives": int(y.sum()),
    "auc_base_rate": 0.5, "auc_shoal": round(online, 4),
    "auc_offline_in_sample": round(roc_auc_score(y, offline.decision_function(z)), 4),
}))
