//! One way to configure a server: flags, `CHAT_*` environment variables and
//! an optional TOML file, in that order of precedence, over the defaults.
//!
//! Every option a binary has is a `clap` argument. [`parse`] gives each one
//! an environment variable named after its flag (`--max-connections` is
//! `CHAT_MAX_CONNECTIONS`) unless it already has one, reads the file named
//! by `--config` (or `CHAT_CONFIG`), and feeds each of the file's keys to
//! `clap` as if it were a flag, but only for options that neither a flag nor
//! the environment set. So one parser checks every value, whatever its
//! source, and a bad one fails at start naming the option (and the file).
//!
//! The file's keys are the flags' names without the dashes in front:
//!
//! ```toml
//! listen = "0.0.0.0:7878"
//! data = "/var/lib/chat"
//! max-connections = 20000
//! tls-cert = "/etc/chat/cert.pem"
//! ```
//!
//! `--print-config` prints the effective configuration in that format, each
//! value with where it came from, so its output is a valid file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

/// Options that are about the configuration itself: never taken from the
/// file, never printed.
const NOT_CONFIGURABLE: &[&str] = &["config", "print_config", "help", "version"];

/// What went wrong while reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("the config file {} is not valid TOML: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where and why.
        source: toml::de::Error,
    },
    /// A key names no option.
    #[error("the config file {} sets `{key}`, which is not an option of this program (see --help)", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value has a type no option takes (a table or an array), or a flag
    /// is not `true` or `false`.
    #[error("the config file {} sets `{key}` to {found}; {expected}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the file has.
        found: String,
        /// What the option takes.
        expected: &'static str,
    },
    /// The option rejected the file's value (clap's message names both).
    #[error("in the config file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// clap's message.
        message: String,
    },
}

impl ConfigError {
    /// A stable code for scripts and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ConfigError::Read { .. } => "config_unreadable",
            ConfigError::Syntax { .. } => "config_syntax",
            ConfigError::UnknownKey { .. } => "config_unknown_key",
            ConfigError::BadValue { .. } | ConfigError::Invalid { .. } => "config_invalid",
        }
    }
}

/// The options about the configuration: flatten into a binary's arguments
/// for [`parse`] to find them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigFile {
    /// Read options from this TOML file (keys are the flags' names, e.g.
    /// `max-connections = 100`); flags and `CHAT_*` variables override it.
    #[arg(long, env = "CHAT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (as a config file, each value
    /// with its source) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Parses `T` from the process's arguments, environment and config file;
/// prints the configuration and exits for `--print-config`, prints help or
/// an error and exits as `clap` does otherwise.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    match parse_from::<T>(std::env::args_os()) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            std::process::exit(0);
        }
        Err(Failure::Clap(err)) => err.exit(),
        Err(Failure::Config(err)) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    }
}

/// What [`parse_from`] found.
#[derive(Debug)]
pub enum Parsed<T> {
    /// The arguments to run with.
    Run(T),
    /// `--print-config`: the text to print.
    Print(String),
}

/// Why [`parse_from`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A flag or variable was wrong, or help or the version was asked for
    /// (`clap` prints and exits for those).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file was wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// [`parse`] over the given arguments (the first is the program's name),
/// without printing or exiting.
pub fn parse_from<T: CommandFactory + FromArgMatches>(
    args: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Parsed<T>, Failure> {
    let command = with_environment(T::command());
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // A first, lenient pass finds the file and which options flags and the
    // environment set. Rules between options (`--tls-cert` needs
    // `--tls-key`) are checked only on everything together: one of a pair
    // may come from the file and the other from a flag.
    let first = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&args)
        .ok();
    let path = first
        .as_ref()
        .and_then(|first| first.get_one::<PathBuf>("config").cloned());
    let (matches, from_file) = match (&path, &first) {
        (Some(path), Some(first)) => {
            let (file_args, from_file) = file_arguments(&command, first, path)?;
            let mut all = args.clone();
            // Right after the program's name: options before any subcommand
            // belong to the program.
            let at = all.len().min(1);
            all.splice(at..at, file_args);
            match command.clone().try_get_matches_from(&all) {
                Ok(matches) => (matches, from_file),
                // Wrong without the file too: the flags' or the
                // environment's fault, said as clap says it.
                Err(err) => match command.clone().try_get_matches_from(&args) {
                    Err(own) if own.kind() == err.kind() => return Err(own.into()),
                    _ => {
                        return Err(ConfigError::Invalid {
                            path: path.clone(),
                            message: first_line(&err.to_string()),
                        }
                        .into());
                    }
                },
            }
        }
        _ => (command.clone().try_get_matches_from(&args)?, Vec::new()),
    };
    if matches.get_flag("print_config") {
        return Ok(Parsed::Print(render(
            &command,
            &matches,
            path.as_deref(),
            &from_file,
        )));
    }
    Ok(Parsed::Run(T::from_arg_matches(&matches)?))
}

/// The environment variable of an option: `CHAT_` and its flag's name in
/// capitals, dashes as underscores.
pub fn variable_of(long: &str) -> String {
    format!("CHAT_{}", long.to_uppercase().replace('-', "_"))
}

/// Gives every option with a long flag and no variable of its own its
/// `CHAT_*` variable, in the command and its subcommands.
fn with_environment(command: clap::Command) -> clap::Command {
    let command = command.mut_args(|arg| {
        let takes_value = matches!(
            arg.get_action(),
            ArgAction::Set | ArgAction::SetTrue | ArgAction::Append
        );
        match arg.get_long() {
            Some(long)
                if takes_value
                    && arg.get_env().is_none()
                    && !NOT_CONFIGURABLE.contains(&arg.get_id().as_str()) =>
            {
                let variable = variable_of(long);
                arg.env(variable)
            }
            _ => arg,
        }
    });
    command.mut_subcommands(with_environment)
}

/// The file's keys as flags, for the options that neither a flag nor the
/// environment set, and the ids of those options.
fn file_arguments(
    command: &clap::Command,
    matches: &ArgMatches,
    path: &Path,
) -> Result<(Vec<OsString>, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Syntax {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let flag = |arg: &clap::Arg| format!("--{}", arg.get_long().unwrap_or(long.as_str()));
        let arg = command
            .get_arguments()
            .find(|arg| {
                let named = arg.get_long() == Some(long.as_str())
                    || arg
                        .get_all_aliases()
                        .is_some_and(|aliases| aliases.contains(&long.as_str()));
                named && !NOT_CONFIGURABLE.contains(&arg.get_id().as_str())
            })
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            })?;
        let set_elsewhere = matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if set_elsewhere {
            continue;
        }
        ids.push(arg.get_id().to_string());
        let bad = |expected| ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
            found: value.to_string(),
            expected,
        };
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => out.push(flag(arg).into()),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("it is a switch: true or false")),
            }
            continue;
        }
        let text = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => {
                return Err(bad("it takes one string or number"));
            }
        };
        out.push(format!("{}={text}", flag(arg)).into());
    }
    Ok((out, ids))
}

/// The effective configuration as a config file: every option, its value
/// and where it came from (an option with no value is commented out).
fn render(
    command: &clap::Command,
    matches: &ArgMatches,
    file: Option<&Path>,
    from_file: &[String],
) -> String {
    let mut out = format!(
        "# {} {}: effective configuration\n\
         # precedence: flags > CHAT_* environment > config file > defaults\n",
        command.get_name(),
        command.get_version().unwrap_or_default(),
    );
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if NOT_CONFIGURABLE.contains(&id) {
            continue;
        }
        let source = match matches.value_source(id) {
            // A file's values arrive as flags.
            Some(ValueSource::CommandLine) if from_file.iter().any(|f| f == id) => {
                "config file".to_string()
            }
            Some(ValueSource::CommandLine) => "flag".to_string(),
            // A switch the file turned off is still at its default value.
            _ if from_file.iter().any(|f| f == id) => "config file".to_string(),
            Some(ValueSource::EnvVariable) => format!(
                "environment {}",
                arg.get_env()
                    .map(|v| v.to_string_lossy())
                    .unwrap_or_default()
            ),
            Some(ValueSource::DefaultValue) => "default".to_string(),
            _ => String::new(),
        };
        let value = if matches!(arg.get_action(), ArgAction::SetTrue) {
            Some(toml::Value::Boolean(matches.get_flag(id)))
        } else {
            matches
                .get_raw(id)
                .and_then(|mut raw| raw.next())
                .map(|raw| typed(&without_password(&raw.to_string_lossy())))
        };
        match value {
            Some(value) => out.push_str(&format!("{long} = {value}  # {source}\n")),
            None => out.push_str(&format!("# {long} = (not set)\n")),
        }
    }
    if let Some(file) = file {
        out.push_str(&format!("# config file: {}\n", file.display()));
    }
    out
}

/// A URL's password as `***` (`postgres://chat:***@host/db`): printed
/// configurations end up in tickets and chat rooms.
fn without_password(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.to_string();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return raw.to_string();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => raw.to_string(),
    }
}

/// A raw value as TOML: a number if it is one (written the same way), a
/// string otherwise (`"007"` stays a string).
fn typed(raw: &str) -> toml::Value {
    match raw.parse::<i64>() {
        Ok(n) if n.to_string() == raw => toml::Value::Integer(n),
        _ => toml::Value::String(raw.to_string()),
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}
