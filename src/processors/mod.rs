//! File processors. `orders-csv` is built in; container and command processors are planned.

pub mod orders_csv;
