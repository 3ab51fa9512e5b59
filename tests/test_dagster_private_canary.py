"""The few names ccat-dagster takes from Dagster's private modules, pinned to what the code relies on.

Dagster exports no public constant for these run tags; the sensors and the asset factory import them from
``dagster._core.storage.tags``. Should a Dagster upgrade move or rename one, this fails first, naming it."""

from __future__ import annotations

from dagster._core.storage import tags


def test_the_run_tags_taken_from_dagster_keep_their_names_and_values():
    assert tags.PARTITION_NAME_TAG == "dagster/partition"
    assert tags.ASSET_PARTITION_RANGE_START_TAG == "dagster/asset_partition_range_start"
    assert tags.ASSET_PARTITION_RANGE_END_TAG == "dagster/asset_partition_range_end"
    assert tags.PARENT_RUN_ID_TAG == "dagster/parent_run_id"
    assert tags.GRPC_INFO_TAG == ".dagster/grpc_info"
