"""The screening core: the Questionnaires compiled, the rules, and the pure steps
parse -> check -> score -> build (the result Bundle, its narrative, the
lifecycle plan of what a store still lacks).

No I/O but reading the shipped definitions, no clock but the one passed in,
no globals. Imports nothing of ours outside this package.
"""
