"""Evaluation harness: hide directions of a full acquisition, predict them, score the methods.

Modules: `split` (uniform input subsets), `cases` (the case object and its loaders),
`metrics` (FA, image and RISH metrics on arrays), `methods` (the up-samplers under test),
`harness` (run the methods on a case) and `report` (tables and figure). The command line is
``qid2-eval`` (`qid2_bidsapp.cli.eval`).
"""
