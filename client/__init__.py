"""The silo: its private shard, its privacy ledger (enforced here), and its answers to rounds."""
