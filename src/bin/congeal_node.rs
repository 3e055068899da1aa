//! `congeal_node`: the ROS 2 perception node (build with `--features ros`).

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "congeal=info".into()))
        .with_writer(std::io::stderr)
        .init();
    congeal::ros::run_node()
}
