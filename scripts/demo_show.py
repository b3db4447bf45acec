#!/usr/bin/env python3
"""Demo helper: upload a file, wait for the agent's output, print what landed (boto3 from the venv)."""
import sys
import time

import boto3

endpoint, bucket, key, path, table = sys.argv[1:6]
kw = dict(endpoint_url=endpoint, region_name="us-east-1")
s3 = boto3.client("s3", **kw)
ddb = boto3.client("dynamodb", **kw)

t0 = time.monotonic()
s3.upload_file(path, bucket, key)
out_key = "output/" + key[len("input/"):]
deadline = time.monotonic() + 120
while True:
    try:
        out = s3.get_object(Bucket=bucket, Key=out_key)["Body"].read().decode()
        break
    except s3.exceptions.NoSuchKey:
        if time.monotonic() > deadline:
            sys.exit(f"no output s3://{bucket}/{out_key} after 120 s: see the agent's log")
        time.sleep(0.05)
elapsed = time.monotonic() - t0
lines = out.splitlines()
print(f"\noutput s3://{bucket}/{out_key}: {len(lines)} lines, {elapsed:.2f} s after the upload began")
for line in lines[:4]:
    print("   ", line)
print("    ...")

try:
    rej = s3.get_object(Bucket=bucket, Key=out_key + ".rejects.csv")["Body"].read().decode()
    print(f"\nrejects s3://{bucket}/{out_key}.rejects.csv:")
    for line in rej.splitlines():
        print("   ", line)
except s3.exceptions.NoSuchKey:
    print("\nno rejects report (every row was valid)")

items = []
kwargs = {"TableName": table, "FilterExpression": "SourceKey = :k",
          "ExpressionAttributeValues": {":k": {"S": key}}}
while True:
    page = ddb.scan(**kwargs)
    items += page["Items"]
    if "LastEvaluatedKey" not in page:
        break
    kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
print(f"\nDynamoDB table {table}: {len(items)} items from this file; three of them:")
cols = ["OrderId", "OrderDate", "Country", "ItemType", "UnitSold", "TotalProfit", "ConfirmationId"]
print("    " + " | ".join(cols))
for it in sorted(items, key=lambda i: i["OrderId"]["S"])[:3]:
    print("    " + " | ".join(next(iter(it[c].values())) for c in cols))
written = len(lines) - 1
if written != len(items):
    sys.exit(f"mismatch: {written} output lines but {len(items)} items")
