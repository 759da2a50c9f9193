"""Run many chains at once: per-chain keys, vmap on each device, shard_map over devices, chunked scans."""
