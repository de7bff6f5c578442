//! A `redis-server` of a test's own, on a Unix socket in a temporary
//! directory, stopped by PID when dropped: for the shared tier's tests and
//! the Redis mirror's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::eventually;

/// A `redis-server` of this test's own, on a Unix socket.
pub struct Redis {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("redis.sock");
        let child = spawn(dir.path(), &socket);
        let redis = Self {
            child,
            socket,
            _dir: dir,
        };
        redis.answering().await;
        redis
    }

    /// Starts the server again (empty) on the same socket, after `kill`.
    pub async fn restart(&mut self) {
        self.child = spawn(self._dir.path(), &self.socket);
        self.answering().await;
    }

    async fn answering(&self) {
        eventually("redis-server to answer PING", async || {
            self.try_command(&["PING"]).await.is_ok()
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    pub async fn try_command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut connection = self.connection().await?;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async(&mut connection).await
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut connection = self.connection().await.expect("connect to redis");
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut connection)
            .await
            .expect("KEYS")
    }

    pub async fn set_raw(&self, key: &str, value: &[u8]) {
        let mut connection = self.connection().await.expect("connect to redis");
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut connection)
            .await
            .expect("SET");
    }

    pub async fn get_raw(&self, key: &str) -> Option<Vec<u8>> {
        let mut connection = self.connection().await.expect("connect to redis");
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("GET")
    }

    /// Commands the server has run, from `INFO commandstats`, by name.
    pub async fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let mut connection = self.connection().await.expect("connect to redis");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .expect("INFO");
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .collect()
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        assert!(self.signal(signal), "signal redis-server");
    }

    pub fn signal(&self, signal: libc::c_int) -> bool {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return false;
        };
        // SAFETY: signals our own child process by its PID.
        unsafe { libc::kill(pid, signal) == 0 }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A frozen server is woken first, so SIGKILL's reaping goes through.
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

fn spawn(dir: &Path, socket: &Path) -> Child {
    Command::new("redis-server")
        .args(["--port", "0", "--save", "", "--appendonly", "no"])
        .arg("--unixsocket")
        .arg(socket)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)")
}
