"""GSM8K through a real tensor-parallel model: every backend answers as the reference does.

Each row-parallel reduce of the model is the backend's fused job, as a server runs it; see
`pytest_allreduce.accuracy.runner` for the rules a backend must meet."""

import pytest

pytestmark = pytest.mark.allreduce_suite("accuracy")


def test_accuracy(allreduce_accuracy):
    allreduce_accuracy.run()
