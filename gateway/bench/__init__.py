"""``gateway bench``: end-to-end performance of two real gateways, against a raw floor.

:mod:`.runner` runs the scenarios, :mod:`.floor` the raw mTLS relay of the
same bytes (also run as ``python -m gateway.bench.floor``, which is why this
package imports nothing), :mod:`.report` prints the figures.
docs/performance.md says what each figure means and what this machine measured.
"""
