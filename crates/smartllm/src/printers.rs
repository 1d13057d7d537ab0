//! Plain-text output of the CLI: rows of string cells as CSV or as an aligned
//! table, written to stdout.

/// A header line and one line per row, comma separated; a cell holding a
/// comma or a double quote is quoted (RFC 4180, inner quotes doubled).
pub fn csv(header: &[String], rows: &[Vec<String>]) {
    println!("{}", header.join(","));
    for r in rows {
        let quoted: Vec<String> = r
            .iter()
            .map(|f| {
                if f.contains([',', '"']) {
                    format!("\"{}\"", f.replace('"', "\"\""))
                } else {
                    f.clone()
                }
            })
            .collect();
        println!("{}", quoted.join(","));
    }
}

/// A header line and one line per row, each column left-aligned to its widest
/// cell, columns two spaces apart. Rows have the header's number of cells.
pub fn table(header: &[String], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for r in rows {
        for (i, f) in r.iter().enumerate() {
            widths[i] = widths[i].max(f.len());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, f)| format!("{f:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(header));
    for r in rows {
        println!("{}", line(r));
    }
}
