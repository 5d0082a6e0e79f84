"""The pip-only fallback stays honest: a few end-to-end tests of the suite run again on a Tansu broker
(SITE_ACTIVITY_EMBEDDED_BROKER=tansu, used where there is no Java 17+). The module-scoped `kafka` fixture
below overrides the session's broker for the imported tests only."""

from __future__ import annotations

import pytest

from dev_stack.embedded import EmbeddedTansu
from tests.test_pipeline import (  # noqa: F401 (collected here again, on Tansu)
    test_posted_events_become_rows_with_every_column,
    test_retried_request_never_duplicates_rows,
)
from tests.test_processors import (  # noqa: F401
    feed,
    pipeline,
    test_identify_retro_link_traits_tenants_and_shared_computer,
    test_sessions_gap_edges_out_of_order_and_duplicates,
)


@pytest.fixture(scope="module")
def kafka(tansu: EmbeddedTansu) -> EmbeddedTansu:
    return tansu
