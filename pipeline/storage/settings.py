"""How to reach the object store: endpoint, profile, retries and the outage budget (the config's `storage` section).

Defined here, not beside the other sections, so that storage imports nothing else of the project: it knows bytes,
URLs and retries only. The config schema includes this section as it is (`Config.storage`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat


class StorageConfig(BaseModel):
    """Object-store access. Credentials come from the standard places (env, AWS profile, instance role), not here."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)  # as every config section

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    region: str | None = None
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/credentials")
    anonymous: bool = False
    create_bucket: bool = Field(
        False, description="an S3 output URL (make_shards/index_shards --out, run.storage, predict.output, export "
        "--out) whose bucket does not exist is refused, naming it, since S3-compatible stores such as SeaweedFS "
        "create a bucket on the first write into it (a typo would make a new one); true creates it instead")
    retries: int = Field(5, ge=0, description="attempts after the first on transient errors (connection refused, "
                         "timeouts, HTTP 5xx/429) for one-off calls: start-up reads, listings, writes; with the "
                         "backoff about 10 s, so a wrong endpoint is reported quickly")
    retry_backoff_s: PositiveFloat = Field(0.5, description="the first wait between attempts; doubled per attempt, "
                                           "at most 10 s, jittered")
    outage_budget_s: PositiveFloat = Field(
        300.0, description="how long reads on the data path (shards streamed by training and the evaluator) keep "
        "retrying a store that is unreachable or failing transiently, from the first failure: an outage shorter "
        "than this costs a wait (logged once, and once when the store is back), not the run. Training's collective "
        "timeout is sized from it: other ranks wait at the next all-reduce while one rank's reads wait")
