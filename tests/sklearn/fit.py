"""Fits scikit-learn's LogisticRegression on examples exported by shoal.

Reads the JSON of `GET /models/{name}/examples` (a file, or stdin) and
writes {"sklearn": version, "intercept": b, "weights": [w or null, ...]}:
the features standardized by the examples' mean and population standard
deviation (a constant feature left out, its weight null), then
LogisticRegression(C=1/l2) with an unpenalized intercept, solved tightly.
SPEC §4 "Predictive models" defines shoal's fit as this optimum;
tests/models.rs holds shoal's weights to these within 1e-6.

    python3 tests/sklearn/fit.py examples.json > sklearn.json
"""
import json
import sys

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression

data = json.load(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin)
x = np.array([e["x"] for e in data["examples"]], dtype=float)
y = np.array([e["y"] for e in data["examples"]], dtype=int)
mean = x.mean(axis=0)
std = x.std(axis=0)  # population deviation (ddof=0)
kept = [j for j in range(x.shape[1]) if not np.all(x[:, j] == x[0, j])]
z = (x[:, kept] - mean[kept]) / std[kept]
model = LogisticRegression(C=1.0 / data["l2"], solver="newton-cholesky", tol=1e-12, max_iter=1000)
model.fit(z, y)
weights = [None] * x.shape[1]
for i, j in enumerate(kept):
    weights[j] = float(model.coef_[0][i])
json.dump({"sklearn": sklearn.__version__, "intercept": float(model.intercept_[0]), "weights": weights}, sys.stdout)
print()
