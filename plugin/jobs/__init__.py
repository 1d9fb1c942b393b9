"""The command line (`backpain-screen`) and bulk work: NDJSON batch scoring,
Bulk Data input and partitions, and `batch --upload`.

May import anything of the plugin's.
"""
