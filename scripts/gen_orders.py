#!/usr/bin/env python3
"""Write a generated orders CSV (the orders-csv header) to a file or stdout.

usage: gen_orders.py OUT ROWS [--bad N] [--pad BYTES] [--seed S]
  --bad N      make N rows invalid in assorted ways (bad number, bad date, empty id, duplicate id)
  --pad BYTES  add an extra Notes column of BYTES characters per row (a large file with few rows)
"""
import argparse
import random
import sys

HEADER = ("Region,Country,ItemType,SalesChannel,OrderPriority,OrderDate,OrderId,ShipDate,"
          "UnitSold,UnitPrice,TotalRevenue,TotalCost,TotalProfit")
REGIONS = [("Europe", "France"), ("Asia", "Japan"), ("Sub-Saharan Africa", "Chad"),
           ("North America", "Canada"), ("Australia and Oceania", "Fiji")]
ITEMS = [("Office Supplies", 651.21, 524.96), ("Cereal", 205.70, 117.11),
         ("Fruits", 9.33, 6.92), ("Cosmetics", 437.20, 263.33)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("rows", type=int)
    ap.add_argument("--bad", type=int, default=0)
    ap.add_argument("--pad", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first-id", type=int, default=100000000)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    bad_at = set(rnd.sample(range(a.rows), min(a.bad, a.rows))) if a.bad else set()
    pad = ("," + "x" * a.pad) if a.pad else ""
    out = sys.stdout if a.out == "-" else open(a.out, "w", buffering=1 << 20)
    out.write(HEADER + (",Notes" if a.pad else "") + "\n")
    kinds = ["number", "date", "empty", "duplicate"]
    lines = []
    nbad = 0
    for i in range(a.rows):
        region, country = REGIONS[i % len(REGIONS)]
        item, price, cost = ITEMS[i % len(ITEMS)]
        units = 1 + (i * 7919) % 9999
        m, d = 1 + i % 12, 1 + i % 28
        order_id = str(a.first_id + i)
        unit_price = f"{price:.2f}"
        order_date = f"{m}/{d}/2020"
        if i in bad_at:
            kind = kinds[nbad % 4]
            nbad += 1
            if kind == "number":
                unit_price = "n/a"
            elif kind == "date":
                order_date = "13/45/2020"
            elif kind == "empty":
                order_id = ""
            elif kind == "duplicate" and i > 0:
                order_id = str(a.first_id)
        revenue = units * price
        total_cost = units * cost
        lines.append(f"{region},{country},{item},Online,{'HMLC'[i % 4]},{order_date},{order_id},"
                     f"{m}/{min(d + 1, 28)}/2020,{units},{unit_price},{revenue:.2f},{total_cost:.2f},"
                     f"{revenue - total_cost:.2f}{pad}\n")
        if len(lines) >= 10000:
            out.write("".join(lines))
            lines.clear()
    out.write("".join(lines))
    if out is not sys.stdout:
        out.close()


if __name__ == "__main__":
    main()
