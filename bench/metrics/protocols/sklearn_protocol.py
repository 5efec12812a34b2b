"""The scikit-learn protocol of DP-MERF's image benchmark (Harder, Adamczewski, Park, AISTATS 2021).

Reproduces ParkLabML/DP-MERF@e4ae72dfba3941dec2ae3ffa7025afedeeb858cd:code_balanced/synth_data_benchmark.py
(`prep_models`, `model_test_run`, `test_passed_gen_data`), with the samples code_balanced/gen_balanced.py
writes (`synthesize_data_with_uniform_labels`: 60,000 samples, exactly balanced labels, generator outputs
in [0, 1]).

What the reference does, read from the code:

- Twelve classifiers with these keyword arguments (everything else scikit-learn's defaults):
  logistic_reg LogisticRegression(solver lbfgs, max_iter 5000, multi_class auto); random_forest
  RandomForestClassifier(n_estimators 100, class_weight balanced); gaussian_nb GaussianNB(); bernoulli_nb
  BernoulliNB(binarize 0.5); linear_svc LinearSVC(max_iter 10000, tol 1e-8, loss hinge); decision_tree
  DecisionTreeClassifier(class_weight balanced, gini, best, ... the defaults); lda
  LinearDiscriminantAnalysis(solver eigen, n_components 9, tol 1e-8, shrinkage 0.5); adaboost
  AdaBoostClassifier(n_estimators 100, algorithm SAMME.R); mlp MLPClassifier(); bagging
  BaggingClassifier(max_samples 0.1, n_estimators 20); gbm GradientBoostingClassifier(subsample 0.1,
  n_estimators 50); xgboost XGBClassifier(colsample_bytree 0.1, objective multi:softprob, n_estimators 50).
- Each is fitted once on the flattened synthetic images and scored on the real test set (torchvision's
  MNIST/FashionMNIST, pixels / 255); no selection. The script prints each accuracy and their mean.
- No seeds are set (each run differs).

Deviations (recorded in every record's `deviations`):

- scikit-learn 1.9 instead of 0.21.2: `multi_class` is gone (lbfgs on several classes is multinomial,
  what "auto" chose); AdaBoost's SAMME.R is gone: SAMME; LinearSVC gets dual=True explicitly (0.21's default,
  the only solver for the hinge loss).
- xgboost: the repository pins no version; its environment (Python 3.6, scikit-learn 0.21.2, 2019) had
  xgboost 0.90, whose XGBClassifier defaults were max_depth 3, learning_rate 0.1, and tree_method "exact"
  on data of this size: set explicitly, since today's defaults differ (6, 0.3, "hist").
- Every classifier that takes a random_state gets the classifier seed: results are repeatable.
- Samples are uint8 / 255 as the methods release them; the reference fits on the generator's floats.
- Labels balanced (index mod classes) in generation order; the reference's are balanced too, sorted
  within each generated batch of 1,000.
- On datasets with fewer than 10 classes LDA's n_components is min(9, classes − 1) (the script runs on
  MNIST and FMNIST only).

DP-HP (ParkLabML/DP-HP@e9aec76845f8a127ba0a7a25614641878199cae7:dp_mehp/all_aux_files.py) copies this
benchmark with two changes (logistic_reg max_iter 50000; adaboost n_estimators 1000, learning_rate 0.7):
its cells are a different protocol ("other:sklearn-dphp" until it is implemented).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn import discriminant_analysis, ensemble, naive_bayes, neural_network, svm, tree
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.metrics.protocols import base

REFERENCE = "ParkLabML/DP-MERF@e4ae72dfba3941dec2ae3ffa7025afedeeb858cd:code_balanced/synth_data_benchmark.py"
MEAN = "mean"  # the pseudo-classifier "all of them", whose metric is their mean accuracy


def _xgboost(seed: int, **kw: Any) -> Any:
    from xgboost import XGBClassifier

    # xgboost 0.90's wrapper defaults (max_depth 3, learning_rate 0.1, exact trees), see the docstring
    return XGBClassifier(colsample_bytree=0.1, objective="multi:softprob", n_estimators=50, max_depth=3,
                         learning_rate=0.1, tree_method="exact", random_state=seed, n_jobs=-1)  # fmt: skip


# name -> constructor(seed, num_classes); the reference's model_specs, in its order
CLASSIFIERS: dict[str, Any] = {
    "logistic_reg": lambda seed, k: LogisticRegression(solver="lbfgs", max_iter=5000),
    "random_forest": lambda seed, k: ensemble.RandomForestClassifier(
        n_estimators=100, class_weight="balanced", random_state=seed, n_jobs=-1
    ),
    "gaussian_nb": lambda seed, k: naive_bayes.GaussianNB(),
    "bernoulli_nb": lambda seed, k: naive_bayes.BernoulliNB(binarize=0.5),
    "linear_svc": lambda seed, k: svm.LinearSVC(max_iter=10000, tol=1e-8, loss="hinge", dual=True, random_state=seed),
    "decision_tree": lambda seed, k: tree.DecisionTreeClassifier(
        class_weight="balanced",
        criterion="gini",
        splitter="best",
        min_samples_split=2,
        min_samples_leaf=1,
        min_weight_fraction_leaf=0.0,
        min_impurity_decrease=0.0,
        random_state=seed,
    ),  # fmt: skip
    "lda": lambda seed, k: discriminant_analysis.LinearDiscriminantAnalysis(
        solver="eigen", n_components=min(9, k - 1), tol=1e-8, shrinkage=0.5
    ),
    "adaboost": lambda seed, k: ensemble.AdaBoostClassifier(n_estimators=100, random_state=seed),
    "mlp": lambda seed, k: neural_network.MLPClassifier(random_state=seed),
    "bagging": lambda seed, k: ensemble.BaggingClassifier(
        max_samples=0.1, n_estimators=20, random_state=seed, n_jobs=-1
    ),
    "gbm": lambda seed, k: ensemble.GradientBoostingClassifier(subsample=0.1, n_estimators=50, random_state=seed),
    "xgboost": lambda seed, k: _xgboost(seed),
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """None: the reference's value (in brackets)."""

    n_train: int | None = None  # [60000] synthetic samples
    classifiers: tuple[str, ...] | None = None  # [all twelve] the classifiers behind the mean

    def __post_init__(self) -> None:
        base.check_positive(self, "n_train")
        if self.classifiers is not None:
            unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
            if unknown or not self.classifiers:
                what = f"unknown classifier {unknown[0]!r}" if unknown else "no classifier"
                raise ValueError(f"classifiers: {what}; choose from {', '.join(CLASSIFIERS)}")


def features(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] → float32 [N, C·H·W] in [0, 1] (pixels / 255, as the reference's inputs)."""
    return (images.reshape(len(images), -1).float() / 255.0).numpy()


class SklearnProtocol(base.Protocol):
    name = "sklearn"
    version = 1
    reference = REFERENCE
    title = (
        "DP-MERF's benchmark: 12 scikit-learn classifiers (and xgboost) fitted once on 60k samples; accuracy and mean"
    )
    test_selected = False
    selection = "none: each classifier is fitted once"
    reported = "real test accuracy (%) per classifier; acc_mean_sklearn is their mean"
    metrics = {"logistic_reg": "acc_logreg_sklearn", "mlp": "acc_mlp_sklearn", MEAN: "acc_mean_sklearn"}
    published = {"acc_logreg": "acc_logreg_sklearn", "acc_mlp": "acc_mlp_sklearn", "acc_mean": "acc_mean_sklearn"}
    deviations = (
        "scikit-learn 1.9 (reference 0.21.2): AdaBoost SAMME instead of SAMME.R; LinearSVC dual=True set explicitly",
        "xgboost with the 2019 wrapper defaults set explicitly (max_depth 3, learning_rate 0.1, exact trees)",
        "seeded (random_state = classifier seed); the reference sets none",
        "uint8 samples as the method quantises them; reference: the generator's float outputs",
    )
    Settings = Settings

    def reference_settings(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        return {"n_train": 60_000, "classifiers": tuple(CLASSIFIERS)}

    def settings_of(self, classifier: str) -> set[str] | None:
        return None if classifier == MEAN else {"n_train"}  # the classifier list only changes the mean

    def dataset_deviations(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> list[str]:
        out = []
        if dataset not in ("mnist", "fmnist"):
            out.append(f"the reference script runs on MNIST and FMNIST only; applied to {dataset}")
        if num_classes < 10:
            out.append(f"LDA n_components {num_classes - 1} (reference 9) for {num_classes} classes")
        return out

    def run(
        self,
        classifiers: list[str],
        train: ImageDataset,
        test: ImageDataset,
        *,
        settings: dict[str, Any],
        seed: int,
        device: torch.device,
        context: base.Context = base.NO_CONTEXT,  # unused: the samples and the test split are all it needs
    ) -> dict[str, base.Record]:
        if train.num_classes < 2:
            raise BenchError("the sklearn protocol needs at least two classes")
        (fit,), used, shortened = base.take_samples(train, {"n_train": settings["n_train"]})
        x, y = features(fit.images), fit.labels.numpy()
        x_test, y_test = features(test.images), test.labels
        wanted = [c for c in classifiers if c != MEAN]
        if MEAN in classifiers:
            wanted += [c for c in settings["classifiers"] if c not in wanted]
        accuracy: dict[str, float] = {}
        per_class: dict[str, list[float | None]] = {}
        seconds: dict[str, float] = {}
        warned: list[str] = []
        for name in wanted:
            t0 = time.perf_counter()
            model = CLASSIFIERS[name](seed, train.num_classes)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(x, y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                warned.append(name)
            pred = torch.from_numpy(np.asarray(model.predict(x_test)).astype(np.int64))
            accuracy[name] = 100.0 * base.accuracy(pred, y_test)
            per_class[name] = base.per_class(pred, y_test, test.num_classes)
            seconds[name] = time.perf_counter() - t0
        common = dict(n_train=used["n_train"], n_eval=0, n_test=len(test), shortened=shortened,
                      not_converged=warned, selected_epoch=None, curve=None)  # fmt: skip
        out = {}
        for name in classifiers:
            behind = list(settings["classifiers"]) if name == MEAN else [name]
            mean_per_class = [
                None
                if any(per_class[c][k] is None for c in behind)
                else sum(per_class[c][k] for c in behind) / len(behind)  # type: ignore[misc]
                for k in range(test.num_classes)
            ]
            out[name] = base.record(
                self, name, value=sum(accuracy[c] for c in behind) / len(behind), per_class=mean_per_class,
                seed=seed, seconds=sum(seconds[c] for c in behind),
                per_classifier={c: accuracy[c] for c in behind}, parameters=None, optimizer=None, epochs=None,
                batch_size=None, **common,
            )  # fmt: skip
        return out


PROTOCOL = SklearnProtocol()
