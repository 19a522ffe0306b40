"""The inputs of txformer's metric modules: binary labels and predicted probabilities of class 1."""

import datasets


FEATURES = datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")})
INPUTS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted probability of class 1 of each example.
    references (`list` of `int`): true label of each example, 0 or 1.
"""
