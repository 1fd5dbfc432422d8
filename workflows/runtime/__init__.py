"""Ray plumbing shared by the jobs: stage runner, shard pool, placement, Ray session, progress, Train launch."""
