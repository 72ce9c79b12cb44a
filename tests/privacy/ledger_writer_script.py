"""Commit releases to a ledger in a loop, printing each committed release id: the crash test's victim.

    python ledger_writer_script.py LEDGER.sqlite

test_ledger.py kills this with SIGKILL mid-run and checks every id printed here is in the ledger.
"""

import math
import sys

from veil.privacy.accounting import price_release
from veil.privacy.ledger import PrivacyLedger

if __name__ == "__main__":
    ledger = PrivacyLedger(sys.argv[1], budget=math.inf)
    price = price_release(epsilon=0.5, protected=["smiling"], encoding="noise", pixel_mus=[0.5])
    k = 0
    while True:
        rec = ledger.record(image_id=f"img-{k % 50}", protected=["smiling"], epsilon=0.5, strength=0.7, seed=k,
                            level="custom", released_attributes={"smiling": 1}, price=price)
        print(rec.release_id, flush=True)  # printed only after COMMIT returned
        k += 1
