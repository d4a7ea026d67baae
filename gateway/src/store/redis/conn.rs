//! How does the Redis store reach Redis? One connection (or a cluster's), every round trip
//! timed into the metrics under a bounded command label.

use redis::aio::ConnectionManager;

/// One Redis, or a Redis Cluster: every key this store touches in one call shares a hash tag,
/// so the same commands and scripts run on either.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let call = match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        };
        Box::pin(timed(command_name(cmd), call))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let call = match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        };
        Box::pin(timed("PIPELINE", call))
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Every round trip, timed into the metrics (`sluice_redis_call_duration_seconds`).
async fn timed<T>(
    command: &'static str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    let started = std::time::Instant::now();
    let result = call.await;
    crate::metrics::get().record_redis(command, started.elapsed(), result.is_ok());
    result
}

/// The commands this store sends, as metric labels; anything else is OTHER, so the label
/// stays bounded.
fn command_name(cmd: &redis::Cmd) -> &'static str {
    const KNOWN: &[&str] = &[
        "EVALSHA",
        "EVAL",
        "SCRIPT",
        "GET",
        "SET",
        "DEL",
        "INCR",
        "HGET",
        "HSET",
        "HGETALL",
        "HVALS",
        "SADD",
        "SREM",
        "SMEMBERS",
        "ZADD",
        "ZRANGEBYSCORE",
        "XADD",
        "XREAD",
        "MULTI",
        "EXEC",
        "PING",
    ];
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return "OTHER";
    };
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("OTHER")
}
