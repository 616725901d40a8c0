"""From the text a user sent to SQL that DataFusion runs: validation, parameters, rewrites.

sqlglot parses the query once (PostgreSQL dialect, the closest to DataFusion's) so that we
can refuse anything but a single read-only query before DataFusion sees it (and any query
too big to plan or whose functions would build values too big, as nothing stops that
work once started), find the
collections it reads (`workspace.collection`; a bare name means workspace `commons`),
bind `:name` parameters as typed literals (never by pasting text), plan `SEARCH(...)`
predicates for the text index, and rewrite what needs the collection schemas: `typeof(x)`
into per-value type names, comparisons of a field with a
literal into Rockset's dynamic typing (`x = 10` never matches `'10'`; DataFusion would cast),
and mixed-type fields used as numbers. Unchanged queries reach DataFusion as the user wrote
them.
"""

from __future__ import annotations

import datetime
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

import orjson
import pyarrow as pa
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from shoal.index.collection import SCORE_COLUMN
from shoal.index.doctypes import type_members, type_name
from shoal.index.segment import SYSTEM_NAMES
from shoal.index.textindex import WORDS, TextPredicate

from .errors import QueryError
from .sizes import check_built_sizes, integer_literal

DEFAULT_WORKSPACE = "commons"
# Where the engine registers each search's matching documents (no workspace name starts with "_").
SEARCH_SCHEMA = "_search"


def _plain_call(name: str) -> Callable[[list], exp.Expression]:
    return lambda args: exp.Anonymous(this=name, expressions=args)


class _Dialect(Postgres):
    """PostgreSQL, the closest to DataFusion's SQL, with Rockset's search functions kept as
    plain calls (sqlglot would read SEARCH and CONTAINS as other dialects' functions), and so
    DataFusion's time formatting and parsing: their formats are chrono's (`%Y-%m-%d`), which
    sqlglot would rewrite into PostgreSQL's (`YYYY-MM-%D`) when it writes a query back."""

    class Parser(Postgres.Parser):
        FUNCTIONS = {**Postgres.Parser.FUNCTIONS, **{n: _plain_call(n) for n in (
            "SEARCH", "CONTAINS", "PHRASE", "TO_CHAR", "TO_DATE", "TO_TIMESTAMP")}}

        def _parse_unnest(self, with_alias: bool = True) -> exp.Unnest | None:
            """Also Rockset's `UNNEST(tags AS tag)`: the element column's name inside the call."""
            if not self._match_pair(TokenType.UNNEST, TokenType.L_PAREN, advance=False):
                return None
            self._advance()
            expressions = self._parse_wrapped_csv(lambda: self._parse_alias(self._parse_equality(), explicit=True))
            if self._match_pair(TokenType.WITH, TokenType.ORDINALITY):
                self.raise_error("UNNEST ... WITH ORDINALITY is not supported")
            alias = self._parse_table_alias() if with_alias else None
            return self.expression(exp.Unnest(expressions=expressions, alias=alias))


_DIALECT = _Dialect


@dataclass(frozen=True)
class Search:
    """Documents of `collection` matching every predicate, which the engine registers as
    `SEARCH_SCHEMA.table` with a `_score` column; only the best `limit` when that suffices."""

    table: str
    collection: tuple[str, str]
    predicates: tuple[TextPredicate, ...]
    limit: int | None
    # An index filter: its conditions are also in the SQL, so the engine may read the whole
    # collection instead when the index would not narrow the scan much.
    optional: bool = False
    # The collection's fields the query may read from the matches; None: every field.
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DirectSearch:
    """A query that only lists the matches of its one search (`SELECT a, SCORE() AS s FROM c
    WHERE SEARCH(...) ORDER BY SCORE() DESC LIMIT 10`): the engine answers it from the
    matches without DataFusion, whose planning would cost more than a selective search."""

    columns: tuple[tuple[str, str], ...]  # (column of the matches, output name), in order
    by_score: bool  # ORDER BY SCORE() DESC
    limit: int | None


@dataclass(frozen=True)
class PreparedQuery:
    sql: str
    collections: tuple[tuple[str, str], ...]  # (workspace, collection) in first-seen order
    searches: tuple[Search, ...] = ()
    direct: DirectSearch | None = None
    # Liveness functions the engine must define: (name, argument types); see _add_liveness_checks.
    checks: tuple[tuple[str, tuple[pa.DataType, ...]], ...] = ()
    # The collections the SQL still reads as tables (a search's collection may be read only
    # through its matches, and then need not be registered).
    tables: tuple[tuple[str, str], ...] = ()


SchemaLookup = Callable[[str, str], pa.Schema | None]


class _PlanCache:
    """Recently prepared queries, reused while the schemas they were planned against hold.

    Parsing and rewriting cost about a millisecond, more than a selective search itself, and
    dashboards send the same statements again and again. A plan depends only on the text,
    the parameters and the schemas it looked up, so a hit is checked against the current
    schemas (a collection whose schema grew is planned again). Only plans of up to
    `MAX_CACHED_CHARS` (text, parameters and rewritten SQL) are kept: the cache stays within
    tens of MiB, and long texts are rarely sent twice."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._plans: OrderedDict[tuple[str, bytes], tuple[PreparedQuery, tuple]] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, query: str, parameters: list[dict[str, Any]], schema_of: SchemaLookup) -> PreparedQuery:
        try:
            key = (query, orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS))
        except TypeError:
            return _prepare(query, parameters, schema_of)  # a parameter value JSON cannot hold: binding says why
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
        if cached is not None and all(schema_of(*name) == schema for name, schema in cached[1]):
            return cached[0]
        looked_up: dict[tuple[str, str], pa.Schema | None] = {}

        def recording_schema_of(workspace: str, name: str) -> pa.Schema | None:
            looked_up[workspace, name] = schema = schema_of(workspace, name)
            return schema

        prepared = _prepare(query, parameters, recording_schema_of)
        if len(query) + len(key[1]) + len(prepared.sql) > MAX_CACHED_CHARS:
            return prepared
        with self._lock:
            self._plans[key] = (prepared, tuple(looked_up.items()))
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        return prepared


MAX_CACHED_CHARS = 64 * 1024
_PLANS = _PlanCache(512)


def prepare(query: str, parameters: list[dict[str, Any]], schema_of: SchemaLookup) -> PreparedQuery:
    """Validate `query`, bind `parameters`, rewrite what DataFusion cannot say itself."""
    try:
        return _PLANS.prepare(query, parameters, schema_of)
    except RecursionError:  # sqlglot also writes SQL recursively: `a.b.c...` costs frames per level
        raise QueryError(_TOO_DEEP) from None


def _prepare(query: str, parameters: list[dict[str, Any]], schema_of: SchemaLookup) -> PreparedQuery:
    tree = parse_single_query(query)
    changed = _rewrite_lateral_unnest(tree)
    collections = _collections(tree)
    for workspace, name in collections:
        if schema_of(workspace, name) is None:
            raise QueryError(f"collection '{workspace}.{name}' does not exist")
    changed |= _bind_parameters(tree, parameters)
    check_built_sizes(tree)
    names = _output_names(tree)
    searches = _plan_searches(tree, schema_of)
    changed |= bool(searches)
    changed |= _rewrite_typeof(tree, collections, schema_of)
    changed |= _rewrite_typed_comparisons(tree, collections, schema_of)
    changed |= _rewrite_mixed_numbers(tree, collections, schema_of)
    _keep_output_names(tree, names)
    searches = [replace(s, columns=_fields_read(tree, schema_of(*s.collection))) for s in searches]
    direct = _direct_search(tree, searches)
    checks = _add_liveness_checks(tree)
    changed |= bool(checks)
    sql = tree.sql(dialect=_DIALECT, normalize_functions=False) if changed else query
    tables = [c for c in _collections(tree) if c[0] != SEARCH_SCHEMA]
    return PreparedQuery(sql, tuple(collections), tuple(searches), direct, tuple(checks.items()), tuple(tables))


def _fields_read(tree: exp.Expression, schema: pa.Schema | None) -> tuple[str, ...] | None:
    """The fields of a collection of `schema` that `tree` may read: every name it says that is
    one, and `_id` (a name said for something else costs a column, never a wrong answer).
    None (every field) while a `*` other than COUNT(*)'s is left: the planner expands those
    over a search's matches, so one left may read them all."""
    if schema is None or any(not isinstance(star.parent, exp.Count) for star in tree.find_all(exp.Star)):
        return None
    said = {identifier.name for identifier in tree.find_all(exp.Identifier)}
    return tuple(name for name in schema.names if name in said or name == "_id")


def _output_names(tree: exp.Expression) -> dict[int, str]:
    """The text of each unnamed output column, before rewrites change it."""
    return {
        id(column): column.sql(dialect=_DIALECT)
        for select in tree.find_all(exp.Select)
        for column in select.expressions
        if not isinstance(column, (exp.Alias, exp.Star, exp.Column))
    }


def _keep_output_names(tree: exp.Expression, names: dict[int, str]) -> None:
    """Name a rewritten output column as the user wrote it (`SUM(amount)`), not as rewritten."""
    for select in tree.find_all(exp.Select):
        for column in select.expressions:
            original = names.get(id(column))
            if original is not None and column.sql(dialect=_DIALECT) != original:
                column.replace(exp.alias_(column.copy(), original, quoted=True))


# Limits far beyond any real query, on work nothing can interrupt: sqlglot takes ~1 s to
# tokenize and parse 100,000 tokens, and DataFusion's planning grows with the square of an
# expression's depth (`SELECT 1+1+...+1` of 4,000 terms: 15 s) and overflows the thread's
# stack, killing the server, past ~10,000 levels.
MAX_QUERY_CHARS = 256 * 1024
MAX_QUERY_TOKENS = 20_000
MAX_QUERY_DEPTH = 500
# Parameters' values pasted at each `:name` (`IN (:p, :p, ...)` of a 1 MB text: a billion
# characters for DataFusion to parse, and the process aborted): at most the largest body.
MAX_BOUND_CHARS = 8 * 1024 * 1024
# SEARCH(...)es per query: tantivy's work for each runs whole, before the query's deadline
# can stop it, and its matches sit outside the memory pool (780 in one query held a query
# thread for 150 s past a 1 s limit).
MAX_SEARCHES = 16
_TOO_DEEP = "the query nests parentheses, subqueries or paths too deeply"


def parse_single_query(query: str) -> exp.Expression:
    if not query.strip():
        raise QueryError("query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is longer than {MAX_QUERY_CHARS:,} characters")
    dialect = _DIALECT()
    try:
        tokens = dialect.tokenize(query)
    except TokenError as error:
        raise QueryError(f"syntax error: {error}") from None
    if len(tokens) > MAX_QUERY_TOKENS:
        raise QueryError(f"the query has more than {MAX_QUERY_TOKENS:,} tokens (names, values, operators)")
    try:
        statements = [s for s in dialect.parser().parse(tokens, query) if s is not None]
    except ParseError as error:
        first = error.errors[0] if error.errors else {}
        raise QueryError(
            f"syntax error: {first.get('description', str(error))} near '{first.get('highlight', '')}'",
            first.get("line"),
            first.get("col"),
        ) from None
    except RecursionError:  # sqlglot parses nested parentheses and subqueries recursively
        raise QueryError(_TOO_DEEP) from None
    if len(statements) != 1:
        raise QueryError("send exactly one statement")
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        raise QueryError(f"only queries are allowed, not {tree.key.upper()} statements")
    pending = [(tree, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_QUERY_DEPTH:
            raise QueryError(
                f"the query nests expressions more than {MAX_QUERY_DEPTH} deep: write a long OR chain as IN (...)"
            )
        if isinstance(node, (exp.DDL, exp.DML, exp.Command, exp.Set, exp.Into)):
            raise QueryError(f"only queries are allowed, found {node.key.upper()}")
        if isinstance(node, exp.Table) and not node.name:
            _check_table_function(node.this)
        pending.extend((child, depth + 1) for child in node.iter_expressions())
    return tree


# The engine's liveness check (sql/engine.py `Liveness`): `_shoal_alive(TRUE)` on any rows, and
# above a join of N sides `_shoal_alive_<N letters>(...)` given a column of every side, so that
# DataFusion cannot push it below the join, where it would not run: a collection's `_id`
# (letter `i`), else a column `_shoal_live_<n>` that the side computes as `_shoal_alive(TRUE)`
# (letter `r`), which `*` leaves out.
ALIVE_FUNCTION = "_shoal_alive"
_LIVE_COLUMN = "_shoal_live_"


def _add_liveness_checks(tree: exp.Expression) -> dict[str, tuple[pa.DataType, ...]]:
    """Make the query check its deadline where its work is not bounded by the collections'
    size: on the rows of every table function, and on the output of every join (scans check
    it themselves). Returns the functions used."""
    checks: dict[str, tuple[pa.DataType, ...]] = {}
    cte_names = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    for select in list(tree.find_all(exp.Select)):
        if select.args.get("from_") is None:
            continue
        for table in _from_items(select):
            if isinstance(table, exp.Table) and not table.name:
                checked = exp.select("*").from_(exp.Table(this=_table_function_call(table.this)))
                checked = checked.where(exp.Anonymous(this=ALIVE_FUNCTION, expressions=[exp.true()]))
                table.replace(exp.Subquery(this=checked, alias=table.args.get("alias")))
                checks[ALIVE_FUNCTION] = (pa.bool_(),)
        sides = _from_items(select)
        if len(sides) < 2:
            continue
        columns = [_id_column(side, cte_names) or _checked_rows(select, side, n) for n, side in enumerate(sides)]
        is_id = [column.name == "_id" for column in columns]
        name = f"{ALIVE_FUNCTION}_" + "".join("i" if i else "r" for i in is_id)
        checks[name] = tuple(pa.string() if i else pa.bool_() for i in is_id)
        select.where(exp.Anonymous(this=name, expressions=columns), append=True, copy=False)
    return checks


def _checked_rows(select: exp.Select, side: exp.Expression, number: int) -> exp.Column:
    """Replace `side`, a FROM item of `select` other than a collection, by its rows with a
    column that checks the deadline (left out of the `*` of `select`); return that column."""
    if isinstance(side, exp.Lateral):
        raise QueryError("LATERAL is not supported: join a subquery or use UNNEST")
    column = _LIVE_COLUMN + str(number)
    name = side.args["alias"].this if side.args.get("alias") else side.this if isinstance(side, exp.Table) else None
    check = exp.alias_(exp.Anonymous(this=ALIVE_FUNCTION, expressions=[exp.true()]), column, quoted=True)
    alias = exp.TableAlias(this=name.copy()) if name else None
    rows = exp.Subquery(this=exp.Select(expressions=[exp.Star(), check]), alias=alias)
    side.replace(rows)
    rows.this.set("from_", exp.From(this=side))  # moved, not copied: later passes edit it in place
    for expression in select.expressions:
        qualified = isinstance(expression, exp.Column) and isinstance(expression.this, exp.Star)
        if isinstance(expression, exp.Star) or (qualified and name is not None and expression.table.lower() == name.name.lower()):
            star = expression.this if qualified else expression
            star.set("except_", [*(star.args.get("except_") or []), exp.column(column, quoted=True)])
    return exp.column(column, quoted=True)


def _table_function_call(function: exp.Expression) -> exp.Expression:
    """The call as DataFusion names it (sqlglot would print GENERATE_SERIES, an unknown name
    to DataFusion's case-sensitive lookup)."""
    if isinstance(function, exp.ExplodingGenerateSeries):
        arguments = [function.args[k].copy() for k in ("start", "end", "step") if function.args.get(k)]
        return exp.Anonymous(this="generate_series", expressions=arguments)
    return function.copy()


def _id_column(source: exp.Expression, cte_names: set[str]) -> exp.Column | None:
    """`_id` of a collection read by `source` (every collection has one), else None."""
    if not isinstance(source, exp.Table) or not source.name or (not source.db and source.name in cte_names):
        return None
    if source.alias:
        return exp.column("_id", table=source.alias)
    return exp.column("_id", table=source.name, db=source.db or None)


# Table functions that only compute: anything else in FROM (read_csv, parquet_metadata, a
# function a later DataFusion adds) could read files or the network, so it is refused.
_TABLE_FUNCTIONS = {"generate_series", "range"}


def _check_table_function(source: exp.Expression | None) -> None:
    if isinstance(source, exp.ExplodingGenerateSeries):
        return
    if source is None:  # `ROWS FROM (...)`: sqlglot's one table source without a function
        raise QueryError("ROWS FROM (...) is not supported")
    name = source.name if isinstance(source, exp.Anonymous) else source.key
    if name.lower() not in _TABLE_FUNCTIONS:
        raise QueryError(
            f"table function '{name}' is not allowed: queries read collections, "
            f"unnest(...) and {', '.join(sorted(_TABLE_FUNCTIONS))}(...)"
        )


# The column that joins an unnested element back to its document (see _rewrite_lateral_unnest).
_UNNEST_KEY = "_unnest_of"


def _rewrite_lateral_unnest(tree: exp.Expression) -> bool:
    """Rockset's `FROM c CROSS JOIN UNNEST(c.tags AS tag) AS u`: one row per element, next to
    its document. DataFusion cannot unnest a column of another FROM item, so the UNNEST
    becomes a subquery over the same collection, joined back by `_id`:
    `JOIN (SELECT _id AS _unnest_of, unnest(tags) AS tag FROM c) AS u ON u._unnest_of = c._id`,
    and `*` lists the element column rather than the join key. A document whose array is
    empty or missing yields no row, as in Rockset."""
    changed = False
    for select in list(tree.find_all(exp.Select)):
        joins = select.args.get("joins") or []
        for number, join in enumerate(joins):
            unnest = join.this
            if not isinstance(unnest, exp.Unnest) or unnest.find(exp.Column) is None:
                continue  # UNNEST of a literal array is DataFusion's own
            if len(unnest.expressions) != 1:
                raise QueryError("UNNEST takes one array field, e.g. CROSS JOIN UNNEST(c.tags AS tag)")
            array = unnest.expressions[0]
            element = array.alias if isinstance(array, exp.Alias) else "unnest"
            array = array.this if isinstance(array, exp.Alias) else array
            source = _unnest_source(select, array)
            alias = unnest.alias or f"_unnest{number}"
            path = array.copy()
            for column in path.find_all(exp.Column):
                column.set("table", None)
            table = source.copy()
            table.set("alias", None)
            subquery = (
                exp.select(exp.alias_(exp.column("_id"), _UNNEST_KEY), exp.alias_(exp.func("unnest", path), element, quoted=True))
                .from_(table)
                .subquery(alias)
            )
            on = exp.EQ(this=exp.column(_UNNEST_KEY, table=alias), expression=exp.column("_id", table=source.alias_or_name))
            join.replace(exp.Join(this=subquery, on=on))
            if any(isinstance(e, exp.Star) for e in select.expressions):
                others = [s for s in _from_items(select) if s.alias_or_name != alias]
                stars = [exp.column(exp.Star(), table=s.alias_or_name) for s in others]
                stars.append(exp.column(element, table=alias, quoted=True))
                select.set("expressions", [x for e in select.expressions for x in (stars if isinstance(e, exp.Star) else [e])])
            changed = True
    return changed


def _unnest_source(select: exp.Select, array: exp.Expression) -> exp.Table:
    """The collection (a FROM item of `select`) whose field `array` is: the one it names, or
    the only one (Rockset's `FROM c CROSS JOIN UNNEST(tags AS tag)`)."""
    qualifiers = {column.table for column in array.find_all(exp.Column)}
    collections = [source for source in _from_items(select) if isinstance(source, exp.Table)]
    if qualifiers == {""} and len(collections) == 1:
        return collections[0]
    for source in collections:
        if source.alias_or_name in qualifiers:
            return source
    raise QueryError(f"UNNEST({array.sql(dialect=_DIALECT)}): name the array by a collection in FROM, "
                     "e.g. FROM orders o CROSS JOIN UNNEST(o.tags AS tag)")


def _from_items(select: exp.Select) -> list[exp.Expression]:
    return [select.args["from_"].this, *(join.this for join in select.args.get("joins") or [])]


def _collections(tree: exp.Expression) -> list[tuple[str, str]]:
    cte_names = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    found: dict[tuple[str, str], None] = {}
    for table in tree.find_all(exp.Table):
        if not table.name:
            continue  # a table function or subquery source
        if table.catalog:
            raise QueryError(f"unknown catalog '{table.catalog}': name collections as workspace.collection")
        if not table.db and table.name in cte_names:
            continue
        found[(table.db or DEFAULT_WORKSPACE, table.name)] = None
    return list(found)


_PARAMETER_TYPES: dict[str, Callable[[Any], exp.Expression]] = {
    "int": lambda v: exp.Literal.number(_parse_int(v)),
    "float": lambda v: exp.Literal.number(repr(_parse_float(v))),
    "string": lambda v: exp.Literal.string(_parse_text(v)),
    "bool": lambda v: exp.Boolean(this=_parse_bool(v)),
    # Rockset's time types, as ISO 8601 text: a calendar date, a time of day, a date and time
    # of day with no zone, and an instant (a zone is required; bound in UTC, so it compares
    # with `_event_time`).
    "date": lambda v: _typed_text(datetime.date.fromisoformat(_parse_text(v)).isoformat(), "DATE"),
    "time": lambda v: _typed_text(_parse_time(v).isoformat(), "TIME"),
    "datetime": lambda v: _timestamp(_parse_datetime(v, zoned=False)),
    "timestamp": lambda v: _timestamp(_parse_datetime(v, zoned=True).astimezone(datetime.timezone.utc)),
}


def _typed_text(text: str, sql_type: str) -> exp.Expression:
    return exp.Cast(this=exp.Literal.string(text), to=exp.DataType.build(sql_type))


def _timestamp(moment: datetime.datetime) -> exp.Expression:
    """In microseconds, as `_event_time` is, so every year Python takes fits (SQL's TIMESTAMP
    is DataFusion's nanoseconds: 1677 to 2262); an instant in UTC, as `_event_time`."""
    zone = 'Some("UTC")' if moment.tzinfo else "None"
    return exp.Anonymous(this="arrow_cast", expressions=[
        exp.Literal.string(moment.replace(tzinfo=None).isoformat()), exp.Literal.string(f"Timestamp(Microsecond, {zone})")])


def _parse_time(value: Any) -> datetime.time:
    moment = datetime.time.fromisoformat(_parse_text(value))
    if moment.tzinfo is not None:
        raise ValueError(f"a time zone in {value!r}")
    return moment


def _parse_datetime(value: Any, zoned: bool) -> datetime.datetime:
    """An ISO 8601 date and time of day, with a zone (`Z`, `+02:00`) exactly when `zoned`."""
    moment = datetime.datetime.fromisoformat(_parse_text(value))
    if (moment.tzinfo is not None) != zoned:
        raise ValueError(f"{'no' if zoned else 'a'} time zone in {value!r}")
    return moment


def _parse_int(value: Any) -> int:
    """An int64, or its text; a float only when whole (int() would cut 1.9 to 1)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"not an int: {value!r}")
    number = int(value)
    if not -(2**63) <= number < 2**63:  # DataFusion would read a longer literal as a float
        raise ValueError(f"not an int64: {value!r}")
    return number


def _parse_float(value: Any) -> float:
    """A finite number, or its text: SQL has no literal for nan or inf (their text would
    become a bare name, read as a column)."""
    number = float(value)
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"not a finite float: {value!r}")
    return number


def _parse_text(value: Any) -> str:
    """Text, or a number or bool as its text; null is refused, not bound as the text 'None'."""
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"not a string: {value!r}")
    return str(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"not a bool: {value!r}")
    return text == "true"


def _bind_parameters(tree: exp.Expression, parameters: list[dict[str, Any]]) -> bool:
    values: dict[str, exp.Expression] = {}
    for parameter in parameters:
        name, type_, value = parameter.get("name"), parameter.get("type"), parameter.get("value")
        if not isinstance(name, str) or type_ not in _PARAMETER_TYPES:
            raise QueryError(
                f"each parameter needs a name and a type among {', '.join(_PARAMETER_TYPES)}: {parameter!r}"
            )
        try:
            values[name] = _PARAMETER_TYPES[type_](value)
        except (TypeError, ValueError, OverflowError):
            raise QueryError(f"parameter '{name}': {value!r} is not a valid {type_}") from None
    placeholders = list(tree.find_all(exp.Placeholder))
    sizes = {name: len(value.sql()) for name, value in values.items()}
    if sum(sizes.get(placeholder.name, 0) for placeholder in placeholders) > MAX_BOUND_CHARS:
        raise QueryError(f"the parameters' values, at each place they are used, come to more than "
                         f"{MAX_BOUND_CHARS:,} characters")
    for placeholder in placeholders:
        if placeholder.name not in values:
            raise QueryError(f"parameter ':{placeholder.name}' has no value in sql.parameters")
        placeholder.replace(values[placeholder.name].copy())
    return bool(placeholders)


def _rewrite_typeof(tree: exp.Expression, collections: list[tuple[str, str]], schema_of: SchemaLookup) -> bool:
    """`typeof(x)` → the type name of each value: `union_tag(x)` for mixed fields, else a constant."""
    calls = list(tree.find_all(exp.Typeof))
    for call in calls:
        argument = call.this
        if not isinstance(argument, (exp.Column, exp.Dot, exp.Bracket)):
            raise QueryError("typeof takes one field, e.g. typeof(price) or typeof(address.city)")
        arrow_type = _field_type(argument, collections, schema_of)
        if arrow_type is None:
            raise QueryError(f"typeof: no field {argument.sql(dialect=_DIALECT)} in {', '.join('.'.join(c) for c in collections)}")
        if pa.types.is_union(arrow_type):
            tag = exp.Anonymous(this="union_tag", expressions=[argument.copy()])
            per_value: exp.Expression = exp.Cast(this=tag, to=exp.DataType.build("VARCHAR"))
        elif pa.types.is_timestamp(arrow_type):
            per_value = exp.Literal.string("timestamp")
        else:
            per_value = exp.Literal.string(type_name(arrow_type))
        rewritten: exp.Expression = exp.Case(
            ifs=[exp.If(this=exp.Is(this=argument.copy(), expression=exp.Null()), true=exp.Literal.string("null"))],
            default=per_value,
        )
        if isinstance(call.parent, exp.Select):  # an unnamed output column keeps a readable name
            rewritten = exp.alias_(rewritten, "typeof")
        call.replace(rewritten)
    return bool(calls)


def _plan_searches(tree: exp.Expression, schema_of: SchemaLookup) -> list[Search]:
    """`WHERE SEARCH(CONTAINS(f, 'words'), PHRASE(g, 'a b'), ...)`, and `WHERE _id = 'x'`
    (a point lookup), → a `Search` evaluated in tantivy; the SELECT then reads its matches
    (table `_search.sN`, aliased as the collection was) with `SCORE()` as their `_score`
    column, and keeps the rest of its WHERE."""
    searches: list[Search] = []
    cte_names = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    for select in list(tree.find_all(exp.Select)):
        where = select.args.get("where")
        conditions = _conjuncts(where.this) if where else []
        calls = [c for c in conditions if isinstance(c, exp.Anonymous) and c.name.upper() == "SEARCH"]
        table = _single_table(select, cte_names)
        lookups = [c for c in conditions if table is not None and _id_lookup(c, table) is not None]
        if not calls and not lookups:
            if table is not None and len(searches) < MAX_SEARCHES:  # beyond, a scan answers as well
                _plan_index_filter(select, table, conditions, schema_of, searches)
            continue
        if table is None:  # so there is a SEARCH: a lookup needs a table
            raise QueryError("SEARCH(...) needs a SELECT over one collection; join its result in an outer query")
        if len(calls) > 1:
            raise QueryError("write one SEARCH(...) per SELECT; it takes several conditions")
        collection = (table.db or DEFAULT_WORKSPACE, table.name)
        schema = schema_of(*collection)
        assert schema is not None, "prepare checked that every collection exists"
        alias = table.alias or table.name
        predicates = [_text_predicate(argument, {alias, table.name}) for call in calls for argument in call.expressions]
        if calls and not predicates:
            raise QueryError("SEARCH needs at least one CONTAINS(field, 'words') or PHRASE(field, 'words')")
        predicates += [TextPredicate(("_id",), _id_lookup(c, table), kind="id") for c in lookups]
        rest = [c for c in conditions if not any(c is used for used in (*calls, *lookups))]
        select.set("where", exp.Where(this=exp.and_(*rest)) if rest else None)
        for score in [node for node in select.find_all(exp.Anonymous) if node.name.upper() == "SCORE"]:
            if score.parent_select is select:
                score.replace(exp.column(SCORE_COLUMN))
        _expand_stars(select, schema.names, {alias, table.name})
        name = f"s{len(searches)}"
        table.replace(exp.Table(this=exp.to_identifier(name), db=exp.to_identifier(SEARCH_SCHEMA), alias=exp.TableAlias(this=exp.to_identifier(alias))))
        searches.append(Search(name, collection, tuple(predicates), _best_only(select)))
        if sum(not search.optional for search in searches) > MAX_SEARCHES:
            raise QueryError(f"a query takes at most {MAX_SEARCHES} SEARCH(...)es or _id lookups")
    for call in tree.find_all(exp.Anonymous):
        if call.name.upper() == "SEARCH":
            raise QueryError("SEARCH(...) must be a condition of a WHERE clause, joined to the others by AND")
        if call.name.upper() == "SCORE":
            raise QueryError("SCORE() needs a SEARCH(...) in the WHERE clause of the same SELECT")
    return searches


def _plan_index_filter(
    select: exp.Select, table: exp.Table, conditions: list[exp.Expression], schema_of: SchemaLookup, searches: list[Search]
) -> None:
    """`WHERE field = literal AND ...` over one collection → an optional `Search` that finds
    candidates in the text index; the condition stays in the WHERE, so the answer is the same
    whether the engine uses the candidates or (when the index would not narrow the scan much)
    the whole collection. Only where the index holds every equal value: strings whose words
    the index keeps, numbers in plain number fields (decimals are indexed as text)."""
    collection = (table.db or DEFAULT_WORKSPACE, table.name)
    schema = schema_of(*collection)
    if schema is None:
        return
    qualifiers = {table.alias or table.name, table.name}
    predicates = [p for p in (_equality_predicate(c, schema, qualifiers) for c in conditions) if p is not None]
    if not predicates:
        return
    _expand_stars(select, schema.names, qualifiers)
    name = f"s{len(searches)}"
    alias = table.alias or table.name
    table.replace(exp.Table(this=exp.to_identifier(name), db=exp.to_identifier(SEARCH_SCHEMA), alias=exp.TableAlias(this=exp.to_identifier(alias))))
    searches.append(Search(name, collection, tuple(predicates), None, optional=True))


_INDEXED_NUMBER_MEMBERS = {"int", "float"}
_EXACT_FLOAT_INTEGERS = 2**53


def _equality_predicate(condition: exp.Expression, schema: pa.Schema, qualifiers: set[str]) -> TextPredicate | None:
    if not isinstance(condition, exp.EQ):
        return None
    for field, literal in ((condition.this, condition.expression), (condition.expression, condition.this)):
        path = _path(field) if isinstance(field, (exp.Column, exp.Dot, exp.Bracket)) else None
        if path is None or not isinstance(literal, exp.Literal):
            continue
        if len(path) > 1 and path[0] in qualifiers and _walk(schema, path) is None:
            path = path[1:]
        arrow_type = _walk(schema, path)
        if arrow_type is None or path[0] in SYSTEM_NAMES:
            continue
        members = set(type_members(arrow_type))
        if literal.is_string:
            words = WORDS.analyze(literal.name)
            # Every word kept (none too long, none split differently), or the index could miss it.
            if "string" in members and words and words == _plain_words(literal.name):
                return TextPredicate(tuple(path), literal.name, kind="equals", value=literal.name)
        elif members and members <= _INDEXED_NUMBER_MEMBERS:
            value = float(literal.name) if not literal.is_int else int(literal.name)
            if abs(value) < _EXACT_FLOAT_INTEGERS:
                return TextPredicate(tuple(path), literal.name, kind="equals", value=value)
    return None


def _plain_words(text: str) -> list[str]:
    """The words a tokenizer splitting at every non-alphanumeric character finds, lowercased:
    what `WORDS` gives when it drops nothing."""
    return re.findall(r"[^\W_]+", text.lower())


def _single_table(select: exp.Select, cte_names: set[str]) -> exp.Table | None:
    """The collection a SELECT reads when it reads exactly one (not a subquery or CTE)."""
    source = select.args.get("from_") or select.args.get("from")
    table = source.this if source else None
    if select.args.get("joins") or not isinstance(table, exp.Table) or not table.name:
        return None
    if not table.db and table.name in cte_names:
        return None
    return table


def _id_lookup(condition: exp.Expression, table: exp.Table) -> str | None:
    """The id in `_id = 'x'` (either way round) on `table`'s `_id`, else None."""
    if not isinstance(condition, exp.EQ):
        return None
    for column, value in ((condition.this, condition.expression), (condition.expression, condition.this)):
        if (
            isinstance(column, exp.Column)
            and column.name == "_id"
            and column.table in ("", table.alias, table.name)
            and isinstance(value, exp.Literal)
            and value.is_string
        ):
            return value.name
    return None


def _expand_stars(select: exp.Select, names: list[str], qualifiers: set[str]) -> None:
    """`*` (or `alias.*`, the collection's alias in `qualifiers`) → the document's fields by
    name, so that `_score` is not among them; with its EXCEPT/EXCLUDE and REPLACE applied.
    A star of something else (`address.*`, a struct) stays for DataFusion."""
    expressions: list[exp.Expression] = []
    for expression in select.expressions:
        if isinstance(expression, exp.Column) and isinstance(expression.this, exp.Star) and expression.table in qualifiers:
            star = expression.this
        elif isinstance(expression, exp.Star):
            star = expression
        else:
            expressions.append(expression)
            continue
        if star.args.get("rename"):
            raise QueryError("* RENAME is not supported over a SEARCH or an indexed filter: name the fields")
        dropped = {column.name for column in star.args.get("except_") or []}
        replaced = {alias.alias: alias for alias in star.args.get("replace") or []}
        expressions.extend(
            replaced[name].copy() if name in replaced else exp.column(name, quoted=True) for name in names if name not in dropped
        )
    select.set("expressions", expressions)


def _conjuncts(condition: exp.Expression) -> list[exp.Expression]:
    condition = condition.unnest()
    if isinstance(condition, exp.And):
        return _conjuncts(condition.this) + _conjuncts(condition.expression)
    return [condition]


def _text_predicate(call: exp.Expression, qualifiers: set[str]) -> TextPredicate:
    name = call.name.upper() if isinstance(call, exp.Anonymous) else ""
    arguments = call.expressions if name in ("CONTAINS", "PHRASE") else []
    if len(arguments) != 2 or not arguments[1].is_string or _path(arguments[0]) is None:
        raise QueryError(
            f"SEARCH takes CONTAINS(field, 'words') and PHRASE(field, 'words') conditions, not {call.sql(dialect=_DIALECT)}"
        )
    path = _path(arguments[0])
    if len(path) > 1 and path[0] in qualifiers:
        path = path[1:]
    return TextPredicate(tuple(path), arguments[1].name, kind=name.lower())


def _best_only(select: exp.Select) -> int | None:
    """k when the SELECT wants just the k best matches: `ORDER BY SCORE() DESC LIMIT k`, with
    nothing else that needs every match (other conditions, grouping, aggregates)."""
    order = select.args.get("order")
    limit, offset = select.args.get("limit"), select.args.get("offset")
    if any(select.args.get(k) for k in ("where", "group", "having", "distinct", "qualify")) or not order or not limit:
        return None
    if any(select.find_all(exp.AggFunc, exp.Window)) or len(order.expressions) != 1:
        return None
    key = order.expressions[0]
    if not key.args.get("desc") or not (isinstance(key.this, exp.Column) and key.this.name == SCORE_COLUMN):
        return None
    count = _row_count(limit.expression)
    skip = _row_count(offset.expression) if offset else 0
    if count is None or skip is None:
        return None
    return count + skip


def _row_count(node: exp.Expression | None) -> int | None:
    """The value of a LIMIT or OFFSET that is an integer literal DataFusion takes (0 to
    2^63-1), else None: DataFusion judges the rest (`LIMIT -1` is a Neg, whose `name` is 1)."""
    count = integer_literal(node)
    return count if count is not None and 0 <= count < 2**63 else None


def _direct_search(tree: exp.Expression, searches: list[Search]) -> DirectSearch | None:
    """The DirectSearch when `tree` (rewritten) is one SELECT of plain columns over its one
    search's matches, ordered by score or not at all, with nothing else to compute."""
    if len(searches) != 1 or not isinstance(tree, exp.Select) or tree.args.get("with_") or tree.args.get("joins"):
        return None
    source = tree.args.get("from_")
    if source is None or not isinstance(source.this, exp.Table) or source.this.db != SEARCH_SCHEMA:
        return None
    if any(tree.args.get(k) for k in ("where", "group", "having", "distinct", "qualify", "offset")):
        return None
    order, limit = tree.args.get("order"), tree.args.get("limit")
    if order is not None:
        keys = order.expressions
        if len(keys) != 1 or not keys[0].args.get("desc") or not _is_column(keys[0].this, SCORE_COLUMN, ""):
            return None
    count = _row_count(limit.expression) if limit is not None else None
    if limit is not None and count is None:
        return None
    alias = source.this.alias_or_name
    columns = []
    for expression in tree.expressions:
        column = expression.this if isinstance(expression, exp.Alias) else expression
        if not isinstance(column, exp.Column) or isinstance(column.this, exp.Star) or column.args.get("db"):
            return None
        if column.table not in ("", alias):
            return None  # `address.city`: a nested field, which DataFusion resolves
        columns.append((column.name, expression.alias if isinstance(expression, exp.Alias) else column.name))
    if len({output for _, output in columns}) != len(columns):
        return None  # DataFusion refuses duplicate output names; let it say so
    return DirectSearch(tuple(columns), order is not None, count)


def _is_column(node: exp.Expression, name: str, table: str) -> bool:
    return isinstance(node, exp.Column) and node.name == name and node.table == table


# The kind of value each document type compares as; a literal only ever matches its own kind.
_MEMBER_KINDS = {"int": "number", "float": "number", "decimal": "number", "string": "string", "bool": "bool"}
_MIRRORED = {exp.LT: exp.GT, exp.GT: exp.LT, exp.LTE: exp.GTE, exp.GTE: exp.LTE, exp.EQ: exp.EQ, exp.NEQ: exp.NEQ}


def _rewrite_typed_comparisons(
    tree: exp.Expression, collections: list[tuple[str, str]], schema_of: SchemaLookup
) -> bool:
    """`field OP literal` compares only values of the literal's kind (Rockset's dynamic typing).

    A value of another kind is neither equal, less nor greater (`=`, `<`... are false) and is
    always different (`!=` is true unless the value is null). For a mixed field each member of
    the literal's kind is compared on its own (`union_extract`); a plain column of another kind
    compares as a constant. DataFusion alone would cast the literal or the column, so
    `x = 10` would match '10' or fail on 'abc'. `x IN (literals)` compares the literals of
    each kind as one list.
    """
    changed = False
    for node in list(tree.find_all(exp.In)):
        values = node.expressions
        if node.args.get("query") or not values or not all(_literal_kind(v) for v in values):
            continue
        by_kind: dict[str | None, list[exp.Expression]] = {}
        for value in values:
            by_kind.setdefault(_literal_kind(value), []).append(value)
        if len(by_kind) < 2 or all(_comparison_plan(node.this, k, collections, schema_of) is None for k in by_kind):
            continue
        # `x IN (10, '10')`: an IN per kind, each compared below as a whole (not as equalities
        # ORed one by one, which DataFusion plans in time quadratic in their number).
        lists = [exp.In(this=node.this.copy(), expressions=[v.copy() for v in same]) for same in by_kind.values()]
        node.replace(exp.Paren(this=exp.or_(*lists)))
        changed = True
    for node in list(tree.find_all(exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE, exp.In)):
        if isinstance(node, exp.In):
            field, values = node.this, node.expressions
            kinds = {_literal_kind(v) for v in values}
            if node.args.get("query") or len(kinds) != 1:
                continue
            kind = kinds.pop()
            comparison: exp.Expression = exp.In(expressions=[v.copy() for v in values])
        else:
            field, literal, operator = node.this, node.expression, type(node)
            if _literal_kind(field) and not _literal_kind(literal):
                field, literal, operator = literal, field, _MIRRORED[operator]
            kind = _literal_kind(literal)
            comparison = (exp.EQ if operator is exp.NEQ else operator)(expression=literal.copy())
        if kind is None or not isinstance(field, (exp.Column, exp.Dot, exp.Bracket)):
            continue
        plan = _comparison_plan(field, kind, collections, schema_of)
        if plan is None:
            continue
        terms = [_compared(value, comparison) for value in plan]
        # Null stays unknown, as in SQL; a value of another kind is a definite FALSE, so that
        # NOT (and NOT IN) reads it as different.
        matched: exp.Expression = exp.Case(
            ifs=[exp.If(this=exp.Is(this=field.copy(), expression=exp.Null()), true=exp.Null())],
            default=exp.Coalesce(this=exp.or_(*terms), expressions=[exp.false()]) if terms else exp.false(),
        )
        node.replace(exp.Not(this=matched) if isinstance(node, exp.NEQ) else matched)
        changed = True
    return changed


def _compared(value: exp.Expression, comparison: exp.Expression) -> exp.Expression:
    """`comparison` (`= 10`, `IN (1, 2)`) of `value`."""
    compared = comparison.copy()
    compared.set("this", value)
    return compared


def _literal_kind(node: exp.Expression) -> str | None:
    if isinstance(node, exp.Neg):
        node = node.this
        return "number" if isinstance(node, exp.Literal) and not node.is_string else None
    if isinstance(node, exp.Literal):
        return "string" if node.is_string else "number"
    if isinstance(node, exp.Boolean):
        return "bool"
    return None


def _comparison_plan(
    field: exp.Expression, kind: str, collections: list[tuple[str, str]], schema_of: SchemaLookup
) -> list[exp.Expression] | None:
    """The values of `field` a literal of `kind` is compared with; None when DataFusion's own
    comparison is already right (same kind, or a type such as a timestamp that reads literals)."""
    arrow_type = _field_type(field, collections, schema_of)
    if arrow_type is None:
        return None
    if pa.types.is_union(arrow_type):
        return [_member_value(field, member.name) for member in arrow_type if _MEMBER_KINDS.get(member.name) == kind]
    if pa.types.is_timestamp(arrow_type) or pa.types.is_null(arrow_type):
        return None
    own_kind = _MEMBER_KINDS.get(type_name(arrow_type), "other")
    return None if own_kind == kind else []


def _member_value(field: exp.Expression, member: str) -> exp.Expression:
    """A mixed field's values of one type; decimals (beyond float64) compare as float64."""
    value: exp.Expression = exp.Anonymous(this="union_extract", expressions=[field.copy(), exp.Literal.string(member)])
    if member == "decimal":
        value = exp.Cast(this=value, to=exp.DataType.build("DOUBLE"))
    return value


# Where a field of mixed types is used as a number; DataFusion cannot do arithmetic on unions.
_NUMERIC_CONTEXTS = (exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.Abs, exp.Round)


def _rewrite_mixed_numbers(tree: exp.Expression, collections: list[tuple[str, str]], schema_of: SchemaLookup) -> bool:
    """In numeric contexts, a mixed field reads as its numbers (as float64 unless all are ints), others NULL."""
    changed = False
    for node in list(tree.find_all(exp.Column, exp.Dot, exp.Bracket)):
        if not isinstance(node.parent, _NUMERIC_CONTEXTS):
            continue
        arrow_type = _field_type(node, collections, schema_of)
        if arrow_type is None or not pa.types.is_union(arrow_type):
            continue
        numbers = [f.name for f in arrow_type if _MEMBER_KINDS.get(f.name) == "number"]
        if not numbers:
            continue
        if numbers == ["int"]:
            node.replace(_member_value(node, "int"))
        else:
            parts = [_member_value(node, name) for name in numbers]
            if numbers[0] == "int":
                parts[0] = exp.Cast(this=parts[0], to=exp.DataType.build("DOUBLE"))
            node.replace(exp.Coalesce(this=parts[0], expressions=parts[1:]))
        changed = True
    return changed


def _field_type(node: exp.Expression, collections: list[tuple[str, str]], schema_of: SchemaLookup) -> pa.DataType | None:
    """Resolve `a`, `t.a`, `a.b.c`, `a['b']` against the collections' schemas."""
    path = _path(node)
    if path is None or _of_derived_table(node):
        return None
    for workspace, name in collections:
        schema = schema_of(workspace, name)
        if schema is None:
            continue
        # A leading qualifier may be the table name or an alias; try with and without it.
        for candidate in (path, path[1:]):
            arrow_type = _walk(schema, candidate)
            if arrow_type is not None:
                return arrow_type
    return None


def _of_derived_table(node: exp.Expression) -> bool:
    """Whether `node` names a column of a subquery or CTE (`u.tag` of an UNNEST): its type is
    not a collection field's, even when a field has the same name."""
    column = node if isinstance(node, exp.Column) else next(node.find_all(exp.Column), None)
    if column is None or not column.table:
        return False
    root = node.root()
    derived = {s.alias for s in root.find_all(exp.Subquery) if s.alias} | {c.alias_or_name for c in root.find_all(exp.CTE)}
    return column.table in derived


def _path(node: exp.Expression) -> list[str] | None:
    if isinstance(node, exp.Column):
        return [part.name for part in node.parts]
    if isinstance(node, exp.Dot):
        left = _path(node.this)
        return None if left is None else left + [node.expression.name]
    if isinstance(node, exp.Bracket) and len(node.expressions) == 1 and node.expressions[0].is_string:
        left = _path(node.this)
        return None if left is None else left + [node.expressions[0].name]
    return None


def _walk(schema: pa.Schema, path: list[str]) -> pa.DataType | None:
    if not path or path[0] not in schema.names:
        return None
    arrow_type = schema.field(path[0]).type
    for part in path[1:]:
        if not pa.types.is_struct(arrow_type) or arrow_type.get_field_index(part) < 0:
            return None
        arrow_type = arrow_type.field(part).type
    return arrow_type
