//! Plain-text tables and JSON documents written to any `io::Write`, so commands can be
//! tested by capturing their output in a buffer.

use std::io::{self, Write};

/// A table with a header row; columns are padded to the widest cell.
#[derive(Debug, Default)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new<I, S>(header: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub(crate) fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let header = (!self.header.is_empty()).then_some(&self.header);
        for row in header.into_iter().chain(&self.rows) {
            write_row(out, row, &widths)?;
        }
        Ok(())
    }
}

fn write_row(out: &mut dyn Write, row: &[String], widths: &[usize]) -> io::Result<()> {
    let mut line = String::new();
    for (i, cell) in row.iter().enumerate() {
        let last = i + 1 == row.len();
        if last {
            // No trailing padding: keeps lines clean for diff and grep.
            line.push_str(cell);
        } else {
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', pad + 2));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// A two-column "FIELD  value" listing for single objects.
#[derive(Debug, Default)]
pub(crate) struct Fields(Table);

impl Fields {
    pub(crate) fn new() -> Self {
        Self(Table::new(Vec::<String>::new()))
    }

    pub(crate) fn add(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.row([name.to_owned(), value.into()]);
        self
    }

    pub(crate) fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        self.0.write(out)
    }
}

/// Writes one pretty-printed JSON document followed by a newline.
pub(crate) fn write_json(out: &mut dyn Write, value: &serde_json::Value) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::other)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(["ID", "SIZE", "NOTE"]);
        t.row(["a", "1 GiB", "x"]);
        t.row(["longer-id", "2 B", ""]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "ID         SIZE   NOTE\na          1 GiB  x\nlonger-id  2 B\n"
        );
    }

    #[test]
    fn fields_have_no_header() {
        let mut f = Fields::new();
        f.add("NAME", "x").add("VENDOR VERSION", "1");
        let mut out = Vec::new();
        f.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME            x\nVENDOR VERSION  1\n"
        );
    }
}
