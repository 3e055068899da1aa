//! The ROS 2 node (`congeal_node`, feature `ros`): subscriptions with approximate-time matching,
//! accumulation into per-category collections on disk, the pipeline as background jobs, services and
//! publications. The node calls the same library API as the CLI.

pub mod bag;
pub mod convert;
pub mod diagnostics;
pub mod live;
pub mod node;

pub use node::run_node;
