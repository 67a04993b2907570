"""Small, self-contained training demos that use only crossent's losses and closed-form gradients.

* :mod:`crossent.demos.digits`: softmax regression by mini-batch SGD on scikit-learn's
  handwritten digits (``crossent demo``).
"""
