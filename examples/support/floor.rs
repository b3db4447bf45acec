//! What the floor programs share: the items `orders-csv` builds for a file, and writing a batch of
//! them the way the agent does (BatchWriteItem, retrying what DynamoDB returns unprocessed).

use std::collections::HashMap;
use std::path::Path;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use offload_agent::config::Schema;
use offload_agent::processors::table::{scan, ConfirmationIds, Items, Plan, ScanLimits, Source};

pub type Item = HashMap<String, AttributeValue>;

/// The items of the orders file at `csv`, as `orders-csv` builds them for the object `src`.
pub fn items(csv: &Path, src: &Source) -> anyhow::Result<Vec<Item>> {
    let plan = Plan::new(&Schema::orders());
    let limits = ScanLimits {
        max_line_bytes: 1 << 20,
        item_overhead: plan.item_overhead(src),
    };
    // Built once, as `orders-csv` does per file.
    let (ids, builder) = (ConfirmationIds::new(src), Items::new(&plan, src));
    let order_id = 6; // the orders schema's partition key, OrderId
    let mut out = Vec::new();
    scan(
        csv,
        &plan,
        limits,
        None,
        None,
        |_, _, _| Ok(()),
        |_, row| {
            let cid = ids.of(row.field(order_id)).to_string();
            out.push(builder.build(|i| Some(row.field(i)), &cid));
            Ok(())
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(out)
}

/// One batch, until DynamoDB has taken all of it.
pub async fn write(
    ddb: aws_sdk_dynamodb::Client,
    table: String,
    batch: Vec<Item>,
) -> anyhow::Result<()> {
    let mut pending: Vec<WriteRequest> = batch
        .into_iter()
        .map(|item| {
            let put = PutRequest::builder().set_item(Some(item)).build()?;
            Ok(WriteRequest::builder().put_request(put).build())
        })
        .collect::<anyhow::Result<_>>()?;
    while !pending.is_empty() {
        let out = ddb
            .batch_write_item()
            .request_items(&table, pending)
            .send()
            .await?;
        pending = out
            .unprocessed_items
            .and_then(|mut m| m.remove(&table))
            .unwrap_or_default();
    }
    Ok(())
}
