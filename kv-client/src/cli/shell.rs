//! `kv-client shell`: the same commands, one a line, over one client (one
//! set of connections, one client id).
//!
//! On a terminal it shows a `kv> ` prompt with line editing and history
//! (rustyline). Driven through a pipe it prints no prompt at all: stdout
//! carries exactly what the one-shot commands would print, so a script can
//! feed it commands and read the answers.

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};

use clap::{Parser, Subcommand};

use super::output::Reply;
use super::{run_bounded, Command, Failure, Settings, EXIT_OK};

pub(crate) const EXAMPLES: &str = "\
Example session:
  $ kv-client shell
  kv> put color blue
  kv> get color
  blue
  kv> cas color green --expect blue
  kv> get --local color
  green
  kv> put \"two words\" 'a value with spaces'
  kv> put bin \"\\x00\\xff\"
  kv> status
  kv> quit

Words are split at spaces; quote them with '...' (literally) or \"...\"
(where \\\\, \\\", \\n, \\t and \\xNN escapes work, as they do unquoted).
Lines starting with # are ignored. Errors are printed and the shell goes on.

Through a pipe there is no prompt, and every command prints exactly what it
prints as a one-shot command (with --output json: one JSON object a line):
  printf 'put k v\\nget k\\n' | kv-client shell
The exit status is 0 at the end of the input or after `quit`.";

/// A line of the shell, parsed like a command line without the program name.
#[derive(Parser, Debug)]
#[command(
    name = "kv-client shell",
    about = "Commands of the kv-client shell, one a line; `help COMMAND` for details.",
    no_binary_name = true,
    mut_subcommand("shell", |c| c.hide(true)),
    mut_subcommand("bench", |c| c.hide(true)),
    disable_version_flag = true,
    override_usage = "COMMAND [ARGS]   (put, get, delete, cas, status, fault, help, quit)"
)]
struct Line {
    /// Change the failure injection of this replica (`fault` only).
    #[arg(long, value_name = "ADDR", global = true)]
    server: Option<String>,

    #[command(subcommand)]
    command: LineCommand,
}

#[derive(Subcommand, Debug)]
enum LineCommand {
    #[command(flatten)]
    Kv(Command),
    /// Leave the shell (also: exit, or end of input).
    #[command(visible_alias = "exit")]
    Quit,
}

/// What the reader thread hands over: a line, the end of input, or an error.
enum Input {
    Line(String),
    Eof,
    Failed(String),
}

/// Reads lines on a thread of its own (reading a terminal or a pipe blocks),
/// one line each time it is asked, so that the prompt appears only after
/// the previous command's output.
struct Reader {
    ask: std::sync::mpsc::Sender<()>,
    lines: tokio::sync::mpsc::Receiver<Input>,
}

impl Reader {
    fn start() -> Reader {
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (send, lines) = tokio::sync::mpsc::channel(1);
        std::thread::spawn(move || {
            let mut next: Box<dyn FnMut() -> Input> = if std::io::stdin().is_terminal() {
                match rustyline::DefaultEditor::new() {
                    Ok(mut editor) => Box::new(move || loop {
                        use rustyline::error::ReadlineError;
                        match editor.readline("kv> ") {
                            Ok(line) => {
                                if !line.trim().is_empty() {
                                    let _ = editor.add_history_entry(line.as_str());
                                }
                                return Input::Line(line);
                            }
                            // Ctrl-C drops the line being typed, as in a shell.
                            Err(ReadlineError::Interrupted) => continue,
                            Err(ReadlineError::Eof) => return Input::Eof,
                            Err(e) => return Input::Failed(e.to_string()),
                        }
                    }),
                    Err(_) => Box::new(plain_lines()),
                }
            } else {
                Box::new(plain_lines())
            };
            while asked.recv().is_ok() {
                let input = next();
                let end = !matches!(input, Input::Line(_));
                if send.blocking_send(input).is_err() || end {
                    break;
                }
            }
        });
        Reader { ask, lines }
    }

    async fn next(&mut self) -> Input {
        if self.ask.send(()).is_err() {
            return Input::Eof;
        }
        self.lines.recv().await.unwrap_or(Input::Eof)
    }
}

/// Lines from stdin with no prompt and no editing (a pipe or a file). Bytes
/// that are not UTF-8 are replaced; use `\xNN` escapes for binary values.
fn plain_lines() -> impl FnMut() -> Input {
    let mut stdin = std::io::stdin().lock();
    move || {
        let mut buf = Vec::new();
        match stdin.read_until(b'\n', &mut buf) {
            Ok(0) => Input::Eof,
            Ok(_) => Input::Line(String::from_utf8_lossy(&buf).into_owned()),
            Err(e) => Input::Failed(e.to_string()),
        }
    }
}

/// Runs the shell until end of input or `quit`; returns 0 then (each
/// command's own status is shown by its output, not by the shell's).
pub(crate) async fn run(settings: Settings) -> u8 {
    let (builder, ids) = match settings.builder() {
        Ok(b) => b,
        Err(f) => return Reply::failed(f).emit(settings.format),
    };
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => return Reply::failed(Failure::from_error(e, false)).emit(settings.format),
    };
    let mut reader = Reader::start();
    loop {
        let line = match reader.next().await {
            Input::Line(l) => l,
            Input::Eof => return EXIT_OK,
            Input::Failed(e) => {
                Reply::failed(Failure::usage(format!("cannot read the input: {e}")))
                    .emit(settings.format);
                return EXIT_OK;
            }
        };
        let words = match split_words(&line) {
            Ok(w) => w,
            Err(e) => {
                Reply::failed(Failure::usage(e)).emit(settings.format);
                continue;
            }
        };
        if words.is_empty() {
            continue;
        }
        let parsed = match Line::try_parse_from(words.into_iter().map(os)) {
            Ok(l) => l,
            Err(e) => {
                show_clap_error(&e, &settings);
                continue;
            }
        };
        let command = match parsed.command {
            LineCommand::Quit => return EXIT_OK,
            LineCommand::Kv(Command::Put { value, .. }) if value == "-" => {
                Reply::failed(Failure::usage(
                    "`put KEY -` reads stdin, which is the shell's input; give the value on the line",
                ))
                .emit(settings.format);
                continue;
            }
            LineCommand::Kv(Command::Shell | Command::Bench(_) | Command::Top(_)) => {
                Reply::failed(Failure::usage(
                    "`shell`, `bench` and `top` cannot be run from the shell",
                ))
                .emit(settings.format);
                continue;
            }
            LineCommand::Kv(c) => c,
        };
        let line_settings = match (&parsed.server, &command) {
            (Some(addr), Command::Fault(_)) => Settings {
                server: Some(addr.clone()),
                ..settings.clone()
            },
            (Some(_), _) => {
                Reply::failed(Failure::usage(
                    "--server inside the shell is for `fault` only; start the shell with --server to talk to one replica",
                ))
                .emit(settings.format);
                continue;
            }
            (None, _) => settings.clone(),
        };
        run_bounded(&line_settings, &client, &ids, command)
            .await
            .emit(settings.format);
    }
}

/// Help goes to stdout; a mistake is shown like any other error.
fn show_clap_error(e: &clap::Error, settings: &Settings) {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{e}");
            let _ = out.flush();
        }
        _ => {
            let msg = super::clap_message(e);
            Reply::failed(Failure::usage(format!("{msg} (try `help`)"))).emit(settings.format);
        }
    }
}

fn os(v: Vec<u8>) -> OsString {
    super::os_from_bytes(v)
}

/// Splits a line into words, shell-like: spaces separate words; `'...'`
/// is literal; in `"..."` and outside quotes, a backslash escapes the next
/// character, and `\n`, `\t`, `\0`, `\xNN` stand for those bytes. A line
/// whose first word starts with `#` is a comment.
pub(crate) fn split_words(line: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut words = Vec::new();
    let mut word: Vec<u8> = Vec::new();
    let mut in_word = false;
    let mut chars = line.trim_end_matches(['\n', '\r']).chars().peekable();
    #[derive(PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }
    let mut quote = Quote::None;
    let push_char = |w: &mut Vec<u8>, c: char| {
        let mut b = [0; 4];
        w.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
    };
    while let Some(c) = chars.next() {
        match (&quote, c) {
            (Quote::None, '#') if !in_word && words.is_empty() => return Ok(Vec::new()),
            (Quote::None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (Quote::None, '\'') => {
                quote = Quote::Single;
                in_word = true;
            }
            (Quote::None, '"') => {
                quote = Quote::Double;
                in_word = true;
            }
            (Quote::Single, '\'') | (Quote::Double, '"') => quote = Quote::None,
            (Quote::Single, c) => push_char(&mut word, c),
            (_, '\\') => {
                in_word = true;
                let Some(e) = chars.next() else {
                    return Err("the line ends with a lone backslash".into());
                };
                match e {
                    'n' => word.push(b'\n'),
                    't' => word.push(b'\t'),
                    'r' => word.push(b'\r'),
                    '0' => word.push(0),
                    'x' => {
                        let hex: String =
                            [chars.next(), chars.next()].into_iter().flatten().collect();
                        let b = u8::from_str_radix(&hex, 16)
                            .ok()
                            .filter(|_| hex.len() == 2)
                            .ok_or_else(|| {
                                format!("\\x{hex} is not a byte: \\x takes two hex digits")
                            })?;
                        word.push(b);
                    }
                    other => push_char(&mut word, other),
                }
            }
            (_, c) => {
                in_word = true;
                push_char(&mut word, c);
            }
        }
    }
    if quote != Quote::None {
        return Err("a quote is not closed".into());
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<Vec<u8>> {
        split_words(s).unwrap()
    }

    #[test]
    fn words_split_at_spaces_and_honour_quotes_and_escapes() {
        assert_eq!(
            split("  put  k   v \n"),
            [b"put".to_vec(), b"k".to_vec(), b"v".to_vec()]
        );
        assert_eq!(
            split(r#"put "two words" 'it''s' a\ b"#),
            [
                b"put".to_vec(),
                b"two words".to_vec(),
                b"its".to_vec(),
                b"a b".to_vec()
            ]
        );
        assert_eq!(split(r#"put k "\x00\xff\n""#)[2], b"\x00\xff\n".to_vec());
        assert_eq!(split(r"'\x41'")[0], br"\x41".to_vec());
        assert_eq!(split(r#"put k """#)[2], Vec::<u8>::new());
        assert!(split("# a comment").is_empty());
        assert!(split("   ").is_empty());
        assert_eq!(split("get a#b")[1], b"a#b".to_vec());
        assert!(split_words("put 'k").is_err());
        assert!(split_words(r"put k \xZ1").is_err());
        assert!(split_words("put k \\").is_err());
    }

    #[test]
    fn shell_lines_parse_like_the_command_line() {
        let l = Line::try_parse_from(["get", "--local", "k"]).unwrap();
        assert!(matches!(
            l.command,
            LineCommand::Kv(Command::Get { local: true, .. })
        ));
        let l = Line::try_parse_from(["exit"]).unwrap();
        assert!(matches!(l.command, LineCommand::Quit));
        let l = Line::try_parse_from(["fault", "--server", "h:1", "--heal"]).unwrap();
        assert_eq!(l.server.as_deref(), Some("h:1"));
        let e = Line::try_parse_from(["help"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(Line::try_parse_from(["frobnicate"]).is_err());
    }
}
