//! QEMU processes: waiting for exit with a pidfd (a zombie is dead, so a
//! slow init reaping a daemonized QEMU costs nothing), killing only the
//! process that really is the instance, CPU time and affinity.

use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub(crate) use kvm_runtime::{kill_and_wait_pidfd, pidfd_open};

/// Waits until `pid` has exited (a zombie counts), up to `timeout`.
/// Returns whether it exited.
pub(crate) async fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let fd = match pidfd_open(pid) {
        Ok(None) => return true,
        Ok(Some(fd)) => fd,
        Err(_) => return poll_exit(pid, timeout).await,
    };
    // SAFETY: `fd` is an OwnedFd, open for as long as the AsyncFd owns it.
    let Ok(afd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
        return poll_exit(pid, timeout).await;
    };
    tokio::time::timeout(timeout, afd.readable()).await.is_ok()
}

/// [`wait_exit`] for places that cannot await (drop guards): blocks the
/// calling thread on the pidfd for up to `timeout`.
pub(crate) fn wait_exit_blocking(pid: i32, timeout: Duration) -> bool {
    let fd = match pidfd_open(pid) {
        Ok(None) => return true,
        Ok(Some(fd)) => fd,
        Err(_) => {
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                if kvm_runtime::is_zombie_or_gone(pid) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            return kvm_runtime::is_zombie_or_gone(pid);
        }
    };
    kvm_runtime::wait_pidfd(&fd, timeout) || kvm_runtime::is_zombie_or_gone(pid)
}

async fn poll_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if kvm_runtime::is_zombie_or_gone(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends SIGKILL to `pid` if, and only if, it is the QEMU of `instance`
/// (its `-name`, and its `-pidfile` when it has one: the same check as
/// `liveness`, so a same-named QEMU of another run dir is never hit;
/// through a pidfd, so a reused pid is never hit). Returns whether a
/// signal was sent.
pub(crate) fn kill_instance(
    pid: i32,
    instance: &kvm_runtime::InstancePaths,
) -> std::io::Result<bool> {
    let Some(fd) = pidfd_open(pid)? else {
        return Ok(false);
    };
    // The pidfd pins the process identity: check it is ours, then signal it.
    if !instance.is_our_process(pid) {
        return Ok(false);
    }
    // SAFETY: pidfd_send_signal(2) on our pidfd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

/// User plus system CPU time of a process, in seconds.
pub(crate) fn cpu_time(pid: i32) -> Option<f64> {
    kvm_runtime::proc_stat(pid).map(|s| s.cpu_secs())
}

/// Restricts thread `tid` to `cpus`.
pub(crate) fn set_affinity(tid: i32, cpus: &[u32]) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c as usize)
            .map_err(|_| std::io::Error::other(format!("CPU {c} is beyond the affinity mask")))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
        .map_err(std::io::Error::from)
}

/// Thread ids of a process.
pub(crate) fn threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Makes the child (QEMU before it daemonizes) die with this process: if
/// gkvm is killed while QEMU initializes, QEMU's parent half is killed
/// too, and its daemon half then fails to report its start and exits —
/// so no QEMU can appear after its starter died, behind the back of the
/// next operation's reconciliation. (Once daemonized, QEMU is on its own:
/// the death signal is not inherited across its fork.)
pub(crate) fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe and called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook runs in the forked child before exec and only
    // makes async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Makes the child join the cgroup whose `cgroup.procs` files are
/// `procs` (one, or one per v1 controller) before it runs: everything it
/// does, its first allocation included, counts against the instance's
/// limits, and a daemonizing child's descendants stay in it.
pub(crate) fn join_cgroup(cmd: &mut std::process::Command, procs: &[std::path::PathBuf]) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    if procs.is_empty() {
        return;
    }
    // Made before the fork: the child may not allocate.
    let files: Vec<std::ffi::CString> = procs
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe calls (open, write, close) on memory made before
    // the fork.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writer itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
}
