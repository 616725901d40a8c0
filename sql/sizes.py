"""What a query's functions build, bounded before it runs.

DataFusion computes a function's value for a whole batch (up to BATCH_ROWS rows) at once,
outside the query's memory pool and between two liveness checks (sql/engine.py): neither
the time limit nor the memory limit can stop a call that builds gigabytes or runs for
minutes, and a failed allocation aborts the process. So `check_built_sizes` estimates, from
the query's text alone, the most characters or elements each expression can hold (a value
read from a field counts as 1: the data is bounded by the collection) and refuses a query
past these limits with a QueryError (400):

- a call building more than MAX_BUILT_SIZE (`repeat`, `lpad`, `range`, `replace`, `encode`,
  `concat_ws`, `array_to_string`, ...), or all of them together more than MAX_BUILT_TOTAL;
- per row, where each row of a batch gets its own copy: a value computed from a field (or
  `random()`/`uuid()`) holding more than MAX_BUILT_SIZE_PER_ROW of constants, a SELECT over
  rows whose columns and groups do, and the constant rows (subquery, CTE, VALUES without
  FROM) that a query reads rows from or joins;
- work that grows with the square of a size (`levenshtein`, `array_has_all`) beyond
  MAX_QUADRATIC_STEPS; a regex or LIKE pattern computed per row beyond MAX_PATTERN_PER_ROW
  (each row's is compiled anew); aggregates that build a value per row of a window.

It is an estimate by known functions: what it does not know counts as the sum of its
arguments.
"""

from __future__ import annotations

import math
import re

from sqlglot import exp

from .errors import QueryError

BATCH_ROWS = 65536  # the largest batch a scan hands on between two liveness checks (`shoal.sql.engine`)

# Functions that build a value whole, of a size one argument gives (its position, or None:
# range and generate_series outside FROM count from their bounds), outside the query's memory
# pool and without a liveness check (`length(repeat('x', 300000000))`: 1.3 GB whatever the
# pool; `unnest(range(100000000))`: 48 s). In FROM, range and generate_series stream rows.
_BUILDERS = {"range": None, "generate_series": None, "repeat": 1, "lpad": 1, "rpad": 1,
             "array_repeat": 1, "list_repeat": 1, "array_resize": 1, "list_resize": 1}
_REPEATERS = {"repeat", "array_repeat", "list_repeat"}
# Functions whose value can be many times longer than their input: each match of what they
# replace (every character, for an empty one) becomes the replacement
# (`replace(repeat('a', 100000), 'a', repeat('b', 9000))`: 900 MB, 6 s past a 1 s limit).
_REPLACERS = {"replace", "regexp_replace", "array_replace", "array_replace_n", "array_replace_all",
              "list_replace", "list_replace_n", "list_replace_all"}
MAX_BUILT_SIZE = 1_000_000
MAX_BUILT_TOTAL = 10 * MAX_BUILT_SIZE  # by all the calls of a query together
# Over a field's values a call runs on every row of a batch (65,536) at once, so less: a value
# repeated (or grown by replacing) at most this often, a padded or resized one at most this long
# (`lpad(s, 100000)` over one batch: 6.5 GB, and the failed allocation aborts the process;
# `max(range(9999))` over rows: 5.2 GB, as elements take 8 to 32 bytes).
MAX_REPEATS_OF_A_FIELD = 10
MAX_BUILT_SIZE_PER_ROW = 1_000
# levenshtein and array_has_all take length × length steps per row, all between two liveness
# checks (`levenshtein(repeat('a', 100000), repeat('b', 100000))`: 11 s past a 1 s limit): at
# most this many per call over constants, about a second, and per batch over a field's values.
MAX_QUADRATIC_STEPS = 1_000_000_000
# A regex or LIKE pattern computed from a field is compiled for each row
# (`regexp_like('z', concat(s, repeat('a', 5000)))` aborted the process): its constants.
MAX_PATTERN_PER_ROW = 100
MAX_PERCENTILE_CENTROIDS = 10_000  # approx_percentile_cont's third argument allocates that many


def check_built_sizes(tree: exp.Expression) -> None:
    """Refuse a call that would build more than MAX_BUILT_SIZE elements or characters, given
    what its arguments build (`repeat(repeat('x', 1000), 2000)`: 2,000,000), a query whose
    calls build more than MAX_BUILT_TOTAL together, a value over rows larger than
    MAX_BUILT_SIZE_PER_ROW, or quadratic work beyond MAX_QUADRATIC_STEPS. The size of a
    value read from a column is not known here, and counts as 1."""
    sizes: dict[int, int] = {}  # the most characters or elements each node's value can hold
    total = 0
    for node in reversed(list(tree.walk())):  # every node after its arguments
        size = len(node.name) if isinstance(node, exp.Literal) and node.is_string else 0
        children = [sizes.get(id(child), 0) for child in node.iter_expressions()]
        size += max(children, default=0) if isinstance(node, _ONE_OF_ITS_ARGUMENTS) else sum(children)
        name, arguments = _builder_call(node)
        if isinstance(node, _FIXED_SIZE_VALUES) or name in _FIXED_SIZE_FUNCTIONS:
            size = MAX_FIXED_SIZE
        elif name in _JOINERS:
            size = _joined_size(name, arguments, sizes)
        elif name in _FORMATTERS:
            size = _FORMATTED_GROWTH * sum(sizes.get(id(a), 0) for a in arguments[1:2]) + MAX_FIXED_SIZE
        elif name in _BUILDERS and not isinstance(node.parent, exp.Table):
            size = _built_size(name, arguments, sizes)
        elif name in _REPLACERS:
            size = _replaced_size(name, node, arguments, sizes)
        elif name in _QUADRATIC:
            _check_quadratic(name, arguments, sizes)
        elif name in _PERCENTILES:
            _check_percentile(name, arguments)
        _check_pattern(node, name, arguments, sizes)
        if isinstance(node, exp.Window) and isinstance(node.this, _VALUE_AGGREGATES):
            raise QueryError("array_agg and string_agg are aggregates, not window functions here: over a window "
                             "each row gets a value that grows with the window (use GROUP BY)")
        if name and size > MAX_BUILT_SIZE:
            raise QueryError(f"{name}(...) would build {size:,} characters or elements, more than {MAX_BUILT_SIZE:,}")
        total += size if name else 0
        if total > MAX_BUILT_TOTAL:
            raise QueryError(f"the query's functions would build {total:,} characters or elements in all, "
                             f"more than {MAX_BUILT_TOTAL:,}")
        small = isinstance(node, _SMALL_VALUES) or name in _SEARCH_CALLS
        per_row = isinstance(node, _ROW_VALUES) and not small and _reads_a_field(node)
        if per_row and size > MAX_BUILT_SIZE_PER_ROW:
            raise QueryError(f"a value computed from a field's values holds at most {MAX_BUILT_SIZE_PER_ROW:,} "
                             f"characters or elements besides them (each row of a batch of {BATCH_ROWS:,} gets its own); "
                             f"this one may hold {size:,}")
        if isinstance(node, exp.AggFunc) and size > MAX_BUILT_SIZE_PER_ROW and _over_rows(node.parent_select):
            raise QueryError(f"an aggregate's input over rows holds at most {MAX_BUILT_SIZE_PER_ROW:,} characters or "
                             f"elements of constants (each row of a batch of {BATCH_ROWS:,} gets its own); this one may hold {size:,}")
        if isinstance(node, exp.Select) and _over_rows(node):
            _check_row_values(node, sizes)
        sizes[id(node)] = 0 if small else size
    for select in tree.find_all(exp.Select):
        if select.args.get("from_"):
            _check_source_constants(select, sizes)


def _over_rows(select: exp.Select | None) -> bool:
    return select is not None and bool(select.args.get("from_") or select.args.get("joins"))


def _check_source_constants(select: exp.Select, sizes: dict[int, int]) -> None:
    """What a query reads rows from is bounded as a SELECT's columns are when it holds
    constants: a join copies each side's values into every row it pairs them with (`FROM c
    CROSS JOIN (SELECT repeat('x', 30000) AS a)`), and a constant row's values (a subquery,
    CTE or VALUES without FROM) are what later calls repeat or pad, where they count as a
    field's (`WITH t AS (SELECT repeat('x', 999000) AS a) SELECT repeat(a, 10) FROM t`).
    Rows a constant row unnests count as their elements, not the whole array."""
    ctes: dict[str, exp.Expression] = {}  # the CTEs it can name: its own and its enclosing queries'
    scope: exp.Expression | None = select
    while scope is not None:
        if isinstance(scope.args.get("with_"), exp.With):
            ctes = {cte.alias: cte.this for cte in scope.args["with_"].expressions} | ctes  # the nearest wins
        scope = scope.parent
    joined = bool(select.args.get("joins"))
    size = 0
    for source in [select.args["from_"].this, *(join.this for join in select.args.get("joins") or [])]:
        if isinstance(source, exp.Table) and source.name in ctes:
            source = ctes[source.name]
        query = source.this if isinstance(source, exp.Subquery) else source
        if isinstance(query, exp.Select) and not query.args.get("from_"):  # a constant row
            size += sum(sizes.get(id(column), 0) for column in query.expressions if not column.find(exp.Explode, exp.Unnest))
        elif joined or isinstance(query, exp.Values):
            size += sizes.get(id(source), 0)
    if size > MAX_BUILT_SIZE_PER_ROW:
        raise QueryError(f"the rows a query reads from hold at most {MAX_BUILT_SIZE_PER_ROW:,} characters or elements "
                         f"of constants (each row, joined or not, is copied or grown by what follows); these may hold {size:,}")


# Calls that multiply what they are given: a separator between or after every value, or hex.
_JOINERS = {"encode", "concat_ws", "array_to_string", "array_join", "list_to_string", "list_join"}
# Calls whose text is their format's, each specifier giving up to this many characters
# (`%c`: 24 characters from 2).
_FORMATTERS = {"to_char", "date_format"}
_FORMATTED_GROWTH = 12
_QUADRATIC = {"levenshtein", "array_has_all", "array_has_any"}
_PERCENTILES = {"approx_percentile_cont": 2, "approx_percentile_cont_with_weight": 3}  # the centroids' argument
# Aggregates whose value grows with their input; over a window, each row gets one.
_VALUE_AGGREGATES = (exp.ArrayAgg, exp.GroupConcat)
# Calls whose pattern (their `expression`; the second argument of the others) is compiled,
# for each row when it reads a field.
_PATTERNS = (exp.Like, exp.ILike, exp.SimilarTo, exp.RegexpLike, exp.RegexpILike, exp.RegexpCount, exp.RegexpReplace)
_PATTERN_FUNCTIONS = {"regexp_like", "regexp_match", "regexp_count", "regexp_replace", "regexp_instr"}
# Values of a bounded size whatever their arguments (hashes, hex, uuid).
_FIXED_SIZE_VALUES = (exp.MD5, exp.SHA, exp.SHA2, exp.Hex, exp.Uuid)
_FIXED_SIZE_FUNCTIONS = {"md5", "sha224", "sha256", "sha384", "sha512", "digest", "to_hex", "uuid"}
MAX_FIXED_SIZE = 128
# Values that differ on every row like a field's (so built per row), though they read none.
_VOLATILE_VALUES = (exp.Rand, exp.Uuid)
_VOLATILE_FUNCTIONS = {"random", "uuid"}
# Values that are one of their arguments: the largest counts, not their sum.
_ONE_OF_ITS_ARGUMENTS = (exp.Case, exp.If, exp.Coalesce, exp.Greatest, exp.Least)
_ROW_VALUES = (exp.Func, exp.Binary, exp.Bracket, exp.Unary)  # computed once per row when they read a field
# Values that stay small whatever their arguments hold (a comparison's truth, a length), so a
# literal compared with each row is not built per row.
_SMALL_VALUES = (exp.Predicate, exp.Connector, exp.Not, exp.Length)
_SEARCH_CALLS = {"search", "contains", "phrase"}  # Rockset's, answered by the text index, never per row


def _check_row_values(select: exp.Select, sizes: dict[int, int]) -> None:
    """What a SELECT over rows returns or groups by is built for every row of a batch,
    constants too (`SELECT repeat('x', 900000) FROM c`: 59 GB over one batch, and the failed
    allocation aborts the process), so together at most MAX_BUILT_SIZE_PER_ROW."""
    size = sum(sizes.get(id(column), 0) for column in [*select.expressions, select.args.get("group")])
    if size > MAX_BUILT_SIZE_PER_ROW:
        raise QueryError(f"the columns and groups of a SELECT over rows hold at most {MAX_BUILT_SIZE_PER_ROW:,} "
                         f"characters or elements of constants per row (each row of a batch of {BATCH_ROWS:,} gets its own); "
                         f"these may hold {size:,}")


def _builder_call(node: exp.Expression) -> tuple[str, list[exp.Expression]]:
    """The function name and arguments of a call, as written ("" for sqlglot's other nodes)."""
    if isinstance(node, exp.Anonymous):
        return node.name.lower(), node.expressions
    if isinstance(node, exp.ExplodingGenerateSeries):
        return "generate_series", [node.args[k] for k in ("start", "end", "step") if node.args.get(k)]
    if isinstance(node, exp.Repeat):
        return "repeat", [node.this, node.args["times"]]
    if isinstance(node, exp.Pad):
        return "lpad" if node.args.get("is_left") else "rpad", [node.this, node.expression]
    if isinstance(node, exp.Replace):
        return "replace", [node.this, node.expression, node.args.get("replacement")]
    if isinstance(node, exp.RegexpReplace):
        return "regexp_replace", [node.this, node.expression, node.args.get("replacement"), node.args.get("modifiers")]
    if isinstance(node, exp.Levenshtein):
        return "levenshtein", [node.this, node.expression]
    if isinstance(node, exp.ArrayContainsAll):
        return "array_has_all", [node.this, node.expression]
    if isinstance(node, exp.Encode):
        return "encode", [node.this]
    if isinstance(node, exp.ConcatWs):
        return "concat_ws", node.expressions
    if isinstance(node, exp.ArrayToString):
        return "array_to_string", [node.this, node.expression]
    return "", []


def _built_size(name: str, arguments: list[exp.Expression], sizes: dict[int, int]) -> int:
    """How many characters or elements a call of `name` builds (1 if its size is no literal)."""
    position = _BUILDERS[name]
    if position is None:
        bounds = [integer_literal(a) for a in arguments]
        if not bounds or None in bounds:
            raise QueryError(f"{name}(...) outside FROM takes integer literals, e.g. {name}(1, 100); in FROM, any bounds")
        start, stop, step = (0, bounds[0], 1) if len(bounds) == 1 else (bounds + [1])[:3]
        if name == "generate_series":  # its stop is included
            stop += 1 if step > 0 else -1
        return max(0, -((start - stop) // step)) if step else 0  # DataFusion refuses a step of 0
    if len(arguments) <= position:
        return 1  # DataFusion says what is missing
    count = integer_literal(arguments[position])
    if count is None:
        raise QueryError(f"{name}(...) takes its size as an integer literal (or a parameter), not from the data")
    if _reads_a_field(arguments[0]):  # built from a field's values: once per row
        most = MAX_REPEATS_OF_A_FIELD if name in _REPEATERS else MAX_BUILT_SIZE_PER_ROW
        if count > most:
            raise QueryError(f"{name}(...) of a field's values builds at most {most:,} "
                             f"{'times the value' if name in _REPEATERS else 'characters or elements'} per row")
    if name in _REPEATERS:
        return max(0, count) * max(1, sizes.get(id(arguments[0]), 0))
    return max(0, count)


def _joined_size(name: str, arguments: list[exp.Expression], sizes: dict[int, int]) -> int:
    """What a call that multiplies its input builds: `encode` (hex: twice the bytes),
    `concat_ws` (its separator between every two values), `array_to_string` and its aliases
    (its separator after every element: over a field's arrays, at most
    MAX_REPEATS_OF_A_FIELD characters)."""
    if name == "encode":
        return 2 * sum(sizes.get(id(a), 0) for a in arguments[:1])
    if name == "concat_ws":
        separator, *values = arguments or [None]
        return sizes.get(id(separator), 0) * max(1, len(values)) + sum(sizes.get(id(v), 0) for v in values)
    if len(arguments) < 2:
        return sum(sizes.get(id(a), 0) for a in arguments)  # DataFusion says what is missing
    array, separator = arguments[0], sizes.get(id(arguments[1]), 0)
    if _reads_a_field(array) and 1 + separator > MAX_REPEATS_OF_A_FIELD:
        raise QueryError(f"{name}(...) of a field's arrays takes a separator of at most "
                         f"{MAX_REPEATS_OF_A_FIELD - 1} characters (it follows every element)")
    return max(1, sizes.get(id(array), 0)) * (1 + separator)


def _replaced_size(name: str, node: exp.Expression, arguments: list[exp.Expression], sizes: dict[int, int]) -> int:
    """What a replacing call builds: its input grown by the most the replacement can add per
    match (every character matches an empty pattern; a regex replacement's `$0` repeats the
    whole match), plus the arguments' own sizes."""
    if len(arguments) < 3 or arguments[2] is None:
        return sum(sizes.get(id(child), 0) for child in node.iter_expressions())  # DataFusion says what is missing
    value, target, replacement = arguments[:3]
    target_text = _text_of(target)
    if _reads_a_field(replacement):
        # A field put into a template (`replace('/items/{id}', '{id}', id)`) is a concat.
        value_text = _text_of(value)
        if name != "replace" or not value_text or not target_text or value_text.count(target_text) > MAX_REPEATS_OF_A_FIELD:
            raise QueryError(f"{name}(...) takes its replacement from the query (a literal, a parameter), or a "
                             f"field's value into a literal text at most {MAX_REPEATS_OF_A_FIELD} times; not from the data")
        return len(value_text)
    replacement_text = _text_of(replacement)
    replacement_size = sizes.get(id(replacement), 0) if replacement_text is None else len(replacement_text)
    if name == "regexp_replace":
        # Each `$`/`\` reference may repeat the whole match (a built replacement: any of it),
        # and with `g` every match, at least `shortest` characters, gets the rest.
        references = replacement_size if replacement_text is None else replacement_text.count("$") + replacement_text.count("\\")
        flags = _text_of(arguments[3]) if len(arguments) > 3 and arguments[3] is not None else ""
        if flags is not None and "g" not in flags:
            growth = 1 + references
        else:
            shortest = _shortest_match(target_text)
            growth = (1 + references + replacement_size if not shortest
                      else max(1, references + -(-replacement_size // shortest)))
    elif not target_text:  # empty, or not a literal: it may match at every character
        growth = 1 + replacement_size
    else:
        growth = max(1, -(-replacement_size // len(target_text)))
    if _reads_a_field(value) and growth > MAX_REPEATS_OF_A_FIELD:
        raise QueryError(f"{name}(...) of a field's values may grow each value at most {MAX_REPEATS_OF_A_FIELD} times "
                         f"per row; this replacement may grow it {growth} times")
    return growth * max(1, sizes.get(id(value), 0)) + sum(sizes.get(id(a), 0) for a in arguments[1:] if a is not None)


def _shortest_match(pattern: str | None) -> int:
    """The fewest characters a match of `pattern` has (0 when unknown or it may be empty),
    by Python's regex parser: close enough to Rust's syntax for a bound, and where it is
    not, 0 is the safe answer."""
    if pattern is None:
        return 0
    try:
        return re._parser.parse(pattern).getwidth()[0]  # type: ignore[attr-defined]
    except Exception:
        return 0


def _check_quadratic(name: str, arguments: list[exp.Expression], sizes: dict[int, int]) -> None:
    """Steps of length × length within MAX_QUADRATIC_STEPS: over constants per call, over a
    field's values per batch. A levenshtein of a field needs its length bounded by `left(f,
    n)`; an array from a field is the data's own size, and a constant beside it is bounded
    per row."""
    per_batch = any(_reads_a_field(argument) for argument in arguments[:2])
    if name == "levenshtein":
        lengths = [_bounded_length(argument, sizes) for argument in arguments[:2]]
        if None in lengths:
            raise QueryError("levenshtein(...) of a field's values takes a bounded part of it, e.g. "
                             "levenshtein(left(name, 100), 'jon'): each call runs length × length steps")
    elif per_batch:
        return
    else:
        lengths = [max(1, sizes.get(id(argument), 0)) for argument in arguments[:2]]
    steps = math.prod(lengths) * (BATCH_ROWS if per_batch else 1)
    if steps > MAX_QUADRATIC_STEPS:
        raise QueryError(f"{name}(...) would take {steps:,} steps{' per batch of rows' if per_batch else ''}, "
                         f"more than {MAX_QUADRATIC_STEPS:,}")


def _check_percentile(name: str, arguments: list[exp.Expression]) -> None:
    position = _PERCENTILES[name]
    if len(arguments) > position:
        centroids = integer_literal(arguments[position])
        if centroids is None or not 0 < centroids <= MAX_PERCENTILE_CENTROIDS:
            raise QueryError(f"{name}(...) takes its number of centroids as an integer literal from 1 to "
                             f"{MAX_PERCENTILE_CENTROIDS:,}")


def _check_pattern(node: exp.Expression, name: str, arguments: list[exp.Expression], sizes: dict[int, int]) -> None:
    """A regex or LIKE pattern computed from a field is compiled for every row: at most
    MAX_PATTERN_PER_ROW characters of constants besides the field's."""
    if isinstance(node, _PATTERNS):
        pattern = node.expression
    elif name in _PATTERN_FUNCTIONS and len(arguments) > 1:
        pattern = arguments[1]
    else:
        return
    if pattern is not None and _reads_a_field(pattern) and sizes.get(id(pattern), 0) > MAX_PATTERN_PER_ROW:
        raise QueryError(f"a pattern computed from a field's values holds at most {MAX_PATTERN_PER_ROW} characters "
                         f"besides them (it is compiled for each row)")


def _bounded_length(node: exp.Expression, sizes: dict[int, int]) -> int | None:
    """The most characters a value can have, when the query says (what it builds, or a field
    cut by `left`/`substr` to a literal length); None when the data decides."""
    cut = None
    if isinstance(node, exp.Left):
        cut = integer_literal(node.expression)
    elif isinstance(node, exp.Substring) and node.args.get("length") is not None:
        cut = integer_literal(node.args["length"])
    if cut is not None and cut >= 0:  # `left(s, -1)` is all of s but its last character
        return cut
    return None if _reads_a_field(node) else sizes.get(id(node), 0)


def _reads_a_field(node: exp.Expression) -> bool:
    """Whether `node`'s value may differ per row: it reads a field or a volatile function."""
    return any(
        isinstance(n, (exp.Column, *_VOLATILE_VALUES))
        or isinstance(n, exp.Anonymous) and n.name.lower() in _VOLATILE_FUNCTIONS
        for n in node.walk()
    )


def _text_of(node: exp.Expression | None) -> str | None:
    """A literal's text (a string's, or a number's as written); None for anything else."""
    return node.name if isinstance(node, exp.Literal) else None


def integer_literal(node: exp.Expression | None) -> int | None:
    """The value of an integer literal (negative ones too); None for anything else."""
    if isinstance(node, exp.Neg):
        value = integer_literal(node.this)
        return None if value is None else -value
    return int(node.name) if isinstance(node, exp.Literal) and node.is_int else None
